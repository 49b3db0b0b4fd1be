"""Weights: verified download (file:// URLs, no network), safe loading, clear mismatch errors."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from spade_edge.export.backbones import WeightSource, get_backbone  # noqa: E402
from spade_edge.export.weights import (  # noqa: E402
    build_with_weights,
    download_verified,
    fetch_checkpoint,
    load_weights,
    read_state_dict,
    resolve_weights,
)
from spade_edge.runtime.errors import WeightsError  # noqa: E402


@pytest.fixture()
def served(tmp_path: Path) -> tuple[str, Path, str]:
    """A 'remote' checkpoint reachable by a file:// URL, and its SHA-256."""
    src = tmp_path / "remote" / "tiny-abc.pth"
    src.parent.mkdir()
    torch.save({"w": torch.arange(6.0)}, src)
    return src.as_uri(), src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_download_verifies_and_lands_atomically(tmp_path, served):
    url, src, digest = served
    cache = tmp_path / "cache"
    dest = cache / "tiny-abc.pth"
    got = download_verified(url, dest, digest[:8], progress=True)  # rich bar on stderr
    assert got == digest
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-abc.pth"]  # no temp left over


def test_wrong_hash_fails_and_leaves_nothing(tmp_path, served):
    url, _, digest = served
    cache = tmp_path / "cache"
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    with pytest.raises(WeightsError, match="does not match the expected"):
        download_verified(url, cache / "tiny-abc.pth", wrong, progress=False)
    assert list(cache.iterdir()) == []


def test_unreachable_url_says_what_to_pass(tmp_path):
    spec = get_backbone("wrn50")
    offline = dataclasses.replace(
        spec, weights=dataclasses.replace(spec.weights, url=(tmp_path / "nope.pth").as_uri())
    )
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"--weights /path/to/wide_resnet50_2-95faca4d\.pth"):
        resolve_weights(offline, "imagenet", cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_cache_hit_is_reused_and_corrupt_cache_replaced(tmp_path, served):
    url, src, digest = served
    cache = tmp_path / "cache"
    source = WeightSource(tag="t", url=url, filename="tiny-abc.pth", sha256=digest[:8])
    path, got = fetch_checkpoint(source, cache, progress=False)
    assert got == digest
    # a verified cached copy is used without touching the URL
    gone = dataclasses.replace(source, url=(tmp_path / "gone.pth").as_uri())
    assert fetch_checkpoint(gone, cache, progress=False) == (path, digest)
    # a truncated cached copy is not trusted: it is downloaded again
    path.write_bytes(path.read_bytes()[:10])
    assert fetch_checkpoint(source, cache, progress=False) == (path, digest)
    assert path.read_bytes() == src.read_bytes()


def test_read_state_dict_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(WeightsError, match=r"evil\.pth: .*pickled code \(io\.open\)"):
        read_state_dict(bad)
    assert not marker.exists()


def test_read_state_dict_garbage_and_non_state_dict(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        read_state_dict(junk)
    notsd = tmp_path / "list.pth"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(WeightsError, match=r"list\.pth: does not contain a state_dict"):
        read_state_dict(notsd)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


def test_read_state_dict_unwraps_common_containers(tmp_path):
    p = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module.a": torch.ones(2), "module.b": torch.zeros(1)}}, p)
    sd = read_state_dict(p)
    assert sorted(sd) == ["a", "b"] and sd["a"].tolist() == [1.0, 1.0]


def test_mismatched_keys_and_shapes_are_named():
    model = get_backbone("resnet18").build()
    sd = dict(model.state_dict())
    del sd["fc.bias"], sd["layer1.0.conv1.weight"]
    sd["head.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as ei:
        load_weights(model, sd, "x.pth")
    msg = str(ei.value)
    assert msg.startswith("x.pth: weights do not fit this backbone")
    assert "2 missing keys (fc.bias, layer1.0.conv1.weight)" in msg
    assert "1 unexpected keys (head.weight)" in msg
    sd = dict(model.state_dict())
    sd["fc.weight"] = torch.zeros(10, 512)
    with pytest.raises(WeightsError, match=r"fc\.weight \(10, 512\) vs \(1000, 512\)"):
        load_weights(model, sd, "x.pth")


def test_local_weights_load_exactly_and_are_tagged(tmp_path):
    spec = get_backbone("resnet18")
    torch.manual_seed(123)
    ref = spec.build()
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "my-r18.pth"
    torch.save(sd, path)  # old-style checkpoint without BN step counters still loads
    model, loaded = build_with_weights(spec, str(path), seed=0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.tag == f"file:my-r18.pth:sha256={digest}"
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training


def test_random_weights_are_seeded():
    spec = get_backbone("resnet18")
    a, la = build_with_weights(spec, "random", seed=7)
    b, _ = build_with_weights(spec, "random", seed=7)
    c, _ = build_with_weights(spec, "random", seed=8)
    assert la.tag == "random:seed=7"
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_missing_local_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match=r"nothere\.pth: weights file not found"):
        resolve_weights(get_backbone("resnet18"), str(tmp_path / "nothere.pth"))


def test_unwritable_cache_is_a_weights_error(tmp_path, served):
    url, _, digest = served
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    source = WeightSource(tag="t", url=url, filename="tiny-abc.pth", sha256=digest[:8])
    with pytest.raises(WeightsError, match=r"cache-is-a-file: cannot write the weights cache"):
        fetch_checkpoint(source, blocker, progress=False)

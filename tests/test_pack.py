"""The packer and spade-pack: features equal the runner's, failures leave no file, dups refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_model import make_tiny_model

from spade_edge.runtime.errors import CompatibilityError, ImageDecodeError, InputError
from spade_edge.runtime.gallery import Gallery, sqnorms_fp16
from spade_edge.runtime.packer import pack
from spade_edge.runtime.preprocess import prepare_path
from spade_edge.runtime.runners import open_runner
from spade_edge.runtime.runners.ort import OrtRunner


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Seven distinct small RGB PNGs (different sizes, so resize/crop really run)."""
    d = tmp_path / "good"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        h, w = 40 + i, 48 - i
        a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(a).save(d / f"{i:03d}.png")
    return d


def _reference(model: Path, paths: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    r = open_runner(model, "ort")
    x = np.stack([prepare_path(p, r.contract).tensor for p in paths])
    f = r.infer(x)
    r.close()
    return f.pooled, f.levels


def test_pack_matches_the_runner(tiny_onnx: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.bin"
    rep = pack(tiny_onnx, [images], out, batch_size=3, progress=False, verify=True)
    paths = sorted(images.glob("*.png"))
    assert rep.n_images == rep.n_added == 7 and rep.n_base == 0
    assert rep.file_bytes == out.stat().st_size and rep.infer_seconds > 0
    pooled, levels = _reference(tiny_onnx, paths)
    with Gallery.open(out, verify=True) as g:
        assert g.fingerprint == rep.fingerprint == OrtRunner(tiny_onnx).fingerprint
        # fp16 of the runner's output, up to ORT's batch-size-dependent last bits
        np.testing.assert_allclose(g.pooled.astype(np.float32), pooled, rtol=2e-3, atol=1e-3)
        for got, want in zip(g.levels, levels, strict=True):
            np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=1e-3)
        assert [s["name"] for s in g.sources] == [str(p) for p in paths]
        assert [s["sha256"] for s in g.sources] == [
            hashlib.sha256(p.read_bytes()).hexdigest() for p in paths
        ]
        # norms computed per batch (overlapped with inference) equal the whole-gallery ones
        np.testing.assert_array_equal(g.pooled_sqnorms, sqnorms_fp16(g.pooled))
        for lv, sq in zip(g.levels, g.level_sqnorms, strict=True):
            np.testing.assert_array_equal(sq, sqnorms_fp16(lv))


def test_batch_size_does_not_change_the_gallery(
    tiny_onnx: Path, images: Path, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    pack(tiny_onnx, [images], a, batch_size=1, progress=False, workers=1)
    pack(tiny_onnx, [images], b, batch_size=4, progress=False, workers=3)
    with Gallery.open(a) as ga, Gallery.open(b) as gb:
        np.testing.assert_allclose(
            ga.pooled.astype(np.float32), gb.pooled.astype(np.float32), rtol=2e-3, atol=1e-3
        )
        assert ga.sources == gb.sources


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_pack_leaves_no_file(
    tiny_onnx: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    out = tmp_path / "out" / "g.bin"
    out.parent.mkdir()
    if existing:
        out.write_bytes(b"old gallery")
    real = OrtRunner.infer
    calls = {"n": 0}

    def failing(self, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the pack
        return real(self, batch)

    monkeypatch.setattr(OrtRunner, "infer", failing)
    with pytest.raises(KeyboardInterrupt):
        pack(tiny_onnx, [images], out, batch_size=2, progress=False)
    assert calls["n"] == 2
    assert os.listdir(out.parent) == (["g.bin"] if existing else [])
    if existing:
        assert out.read_bytes() == b"old gallery"


def test_bad_image_fails_naming_it_or_is_skipped(
    tiny_onnx: Path, images: Path, tmp_path: Path
) -> None:
    bad = images / "004.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    out = tmp_path / "g.bin"
    with pytest.raises(ImageDecodeError, match=r"004\.png"):
        pack(tiny_onnx, [images], out, progress=False)
    assert not out.exists()
    rep = pack(tiny_onnx, [images], out, progress=False, skip_bad=True)
    assert rep.n_images == 6 and [n for n, _ in rep.skipped_bad] == [str(bad)]
    with Gallery.open(out) as g:
        assert str(bad) not in {s["name"] for s in g.sources}


def test_duplicate_content_detected(tiny_onnx: Path, images: Path, tmp_path: Path) -> None:
    shutil.copy(images / "002.png", images / "zzz_copy.png")
    out = tmp_path / "g.bin"
    with pytest.raises(InputError, match=r"zzz_copy\.png: same content as .*002\.png"):
        pack(tiny_onnx, [images], out, progress=False)
    assert not out.exists()
    rep = pack(tiny_onnx, [images], out, progress=False, skip_duplicates=True)
    assert rep.n_images == 7
    assert rep.skipped_duplicates == [(str(images / "zzz_copy.png"), str(images / "002.png"))]


def test_add_to_existing_gallery(tiny_onnx: Path, images: Path, tmp_path: Path) -> None:
    paths = sorted(images.glob("*.png"))
    base = tmp_path / "base.bin"
    pack(tiny_onnx, paths[:4], base, progress=False)
    out = tmp_path / "all.bin"
    with pytest.raises(InputError, match="same content"):
        pack(tiny_onnx, paths[2:], out, progress=False, base_gallery=base)
    rep = pack(tiny_onnx, paths[2:], out, progress=False, base_gallery=base, skip_duplicates=True)
    assert (rep.n_images, rep.n_added, rep.n_base) == (7, 3, 4)
    full = tmp_path / "full.bin"
    pack(tiny_onnx, paths, full, progress=False)
    with Gallery.open(out, verify=True) as g, Gallery.open(full) as f:
        assert g.sources == f.sources
        np.testing.assert_allclose(
            g.pooled.astype(np.float32), f.pooled.astype(np.float32), rtol=2e-3, atol=1e-3
        )
    # in place: the base path itself
    pack(tiny_onnx, paths[4:], base, progress=False, base_gallery=base)
    with Gallery.open(base, verify=True) as g:
        assert g.n_images == 7


def test_add_to_gallery_of_another_model_refused(
    tiny_onnx: Path, images: Path, tmp_path: Path
) -> None:
    other = make_tiny_model(tmp_path / "other.onnx", image_size=32, seed=1)
    base = tmp_path / "base.bin"
    pack(other, [images], base, progress=False)
    out = tmp_path / "out.bin"
    with pytest.raises(CompatibilityError) as e:
        pack(tiny_onnx, [images], out, progress=False, base_gallery=base)
    fa, fb = OrtRunner(other).fingerprint, OrtRunner(tiny_onnx).fingerprint
    assert fa in str(e.value) and fb in str(e.value) and str(base) in str(e.value)
    assert not out.exists()


# ----------------------------------------------------------------------------------- CLI


def _cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    from spade_edge.cli.pack import main

    monkeypatch.setattr(sys, "argv", ["spade-pack", *args])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli_pack(
    tiny_onnx: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "g.bin"
    rc = _cli(monkeypatch, str(tiny_onnx), str(images), "-o", str(out), "--verify", "--no-progress")
    assert rc == 0, capsys.readouterr()
    assert "images in gallery" in capsys.readouterr().out
    with Gallery.open(out) as g:
        assert g.n_images == 7
    extra = tmp_path / "more"
    extra.mkdir()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(extra / "x.png")
    out2 = tmp_path / "g2.bin"
    args = [str(tiny_onnx), str(extra), "-o", str(out2), "--add-to", str(out), "--no-progress"]
    assert _cli(monkeypatch, *args) == 0
    with Gallery.open(out2) as g:
        assert g.n_images == 8


def test_cli_exit_codes(
    tiny_onnx: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "g.bin"
    assert _cli(monkeypatch, str(tmp_path / "nope.onnx"), str(images), "-o", str(out)) == 2
    assert "nope.onnx" in capsys.readouterr().err
    (images / "001.png").write_bytes(b"not a png")
    assert _cli(monkeypatch, str(tiny_onnx), str(images), "-o", str(out), "--no-progress") == 2
    assert "001.png" in capsys.readouterr().err
    args = [str(tiny_onnx), str(images), "-o", str(out), "--skip-bad", "--no-progress"]
    assert _cli(monkeypatch, *args) == 0
    assert "skipped" in capsys.readouterr().err
    other = make_tiny_model(tmp_path / "other.onnx", seed=2)
    args = [str(other), str(images), "-o", str(tmp_path / "x.bin"), "--add-to", str(out)]
    assert _cli(monkeypatch, *args, "--skip-bad", "--no-progress") == 4
    assert not (tmp_path / "x.bin").exists()


# ------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_pack_bottle_train_with_lite0(lite0_onnx: Path, bottle_dir: Path, tmp_path: Path) -> None:
    train = bottle_dir / "train" / "good"
    out = tmp_path / "bottle.bin"
    rep = pack(lite0_onnx, [train], out, batch_size=8, progress=False, verify=True)
    assert rep.n_images == len(list(train.glob("*.png"))) == 209
    with Gallery.open(out, verify=True) as g:
        c = g.contract
        assert c.backbone == "efficientnet_lite0" or "lite0" in c.backbone
        assert g.pooled.shape == (209, c.pooled_dim)
        assert np.isfinite(g.pooled.astype(np.float32)).all()
        # the first image's features equal a direct run of the model (fp16 rounding)
        pooled, levels = _reference(lite0_onnx, sorted(train.glob("*.png"))[:2])
        np.testing.assert_allclose(g.pooled[:2].astype(np.float32), pooled, rtol=1e-2, atol=2e-3)
        for got, want in zip(g.levels, levels, strict=True):
            np.testing.assert_allclose(got[:2].astype(np.float32), want, rtol=1e-2, atol=2e-3)

"""spade-run / Detector / thresholds on a tiny model: outputs, bad inputs, memory, threads."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from spade_edge.cli.run import app as run_app
from spade_edge.runtime.detector import Detector, project_to_original
from spade_edge.runtime.errors import CalibrationError, CompatibilityError, ConfigError
from spade_edge.runtime.preprocess import Geometry


def _images(folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = np.full((*size[::-1], 3), 120, np.uint8)
        noise = rng.integers(0, 20, base.shape, dtype=np.uint8)
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(base + noise).save(p)
        out.append(p)
    return out


@pytest.fixture()
def packed(tiny_onnx: Path, tmp_path: Path) -> tuple[Path, Path]:
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.thresholds import calibrate_gallery

    train = _images(tmp_path / "train", 12, seed=0)
    g = tmp_path / "g.bin"
    pack(tiny_onnx, train, g, progress=False, far=0)
    calibrate_gallery(g, k_image=3, k_gallery=3)
    return tiny_onnx, g


def _anomalous(path: Path) -> Path:
    a = np.full((48, 40, 3), 120, np.uint8)
    a[10:30, 8:30] = [250, 0, 0]
    Image.fromarray(a).save(path)
    return path


def test_run_outputs_json_csv_and_pngs(packed: tuple[Path, Path], tmp_path: Path) -> None:
    model, g = packed
    good = _images(tmp_path / "test", 2, seed=5)
    bad = _anomalous(tmp_path / "test" / "bad.png")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        run_app,
        [
            str(model),
            str(g),
            str(tmp_path / "test"),
            "--k",
            "3",
            "--out",
            str(out),
            "--csv",
            str(tmp_path / "r.csv"),
        ],
    )
    assert r.exit_code == 0, r.output
    recs = {Path(x["image"]).name: x for x in map(json.loads, r.stdout.strip().splitlines())}
    assert set(recs) == {p.name for p in [*good, bad]}
    assert recs["bad.png"]["anomalous"] is True
    assert recs["bad.png"]["score"] > max(recs[p.name]["score"] for p in good)
    overlay = Image.open(out / "bad_overlay.png")
    mask = np.asarray(Image.open(out / "bad_mask.png"))
    assert overlay.size == (40, 48) and mask.shape == (48, 40)  # original geometry
    assert mask[15:25, 12:25].mean() > mask[40:, :].mean()  # the defect is where we put it
    assert (tmp_path / "r.csv").read_text().count("\n") == 4


def test_run_bad_inputs_continue_and_fail(packed: tuple[Path, Path], tmp_path: Path) -> None:
    model, g = packed
    folder = tmp_path / "mixed"
    good = _images(folder, 1, seed=3)[0]
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "text.jpg").write_text("not an image")
    r = CliRunner().invoke(run_app, [str(model), str(g), str(folder), "--k", "3"])
    assert r.exit_code != 0
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    by = {Path(x["image"]).name: x for x in lines}
    assert "score" in by[good.name]
    assert "corrupt.png" in by["corrupt.png"]["error"]
    assert "text.jpg" in by["text.jpg"]["error"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.png"], "missing.png"),
        (["EMPTY"], "no images"),
        (["--k", "99", "IMG"], "larger than the gallery"),
    ],
)
def test_run_clear_errors(packed: tuple[Path, Path], tmp_path: Path, args, needle) -> None:
    model, g = packed
    img = _images(tmp_path / "one", 1, seed=9)[0]
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("IMG", str(img)) for a in args]
    if args == ["missing.png"]:
        args = [str(tmp_path / "missing.png")]
    proc = subprocess.run(
        [sys.executable, "-m", "spade_edge.cli.run", str(model), str(g), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gallery_of_another_model_refused(packed, tmp_path: Path) -> None:
    from tiny_model import make_tiny_model

    _, g = packed
    other = make_tiny_model(tmp_path / "other.onnx", image_size=32, seed=1)
    with pytest.raises(CompatibilityError) as e:
        Detector.load(other, g)
    assert "other.onnx" in str(e.value) and str(g) in str(e.value)


def test_detector_api_memory_flat_and_thread_safe(packed) -> None:
    model, g = packed
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
    with Detector.load(model, g, k_image=3, k_gallery=3) as det:
        ref = det.predict(img)
        assert ref.anomaly_map.shape == (32, 32)
        assert ref.full_map().shape == (48, 40)
        for _ in range(20):  # warm-up
            det.predict(img)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            det.predict(img)
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert grown < 256 * 1024, f"Python heap grew {grown} bytes over 300 calls"
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda _: det.predict(img).score, range(16)))
        assert np.allclose(outs, ref.score, rtol=1e-6)


def test_k_validation_and_stale_thresholds(packed) -> None:
    model, g = packed
    with pytest.raises(ConfigError):
        Detector.load(model, g, k_image=0)
    det = Detector.load(model, g, k_image=2, k_gallery=2)  # thresholds were made for K=3
    assert det.threshold is None and det.thresholds_stale
    det.close()


def test_thresholds_need_enough_images(tiny_onnx: Path, tmp_path: Path) -> None:
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.thresholds import calibrate_gallery

    g = tmp_path / "small.bin"
    pack(tiny_onnx, _images(tmp_path / "few", 4, seed=1), g, progress=False, far=0)
    with pytest.raises(CalibrationError, match="need >= 10"):
        calibrate_gallery(g)


def test_projection_undoes_crop_and_resize() -> None:
    geo = Geometry(
        width=100, height=50, resized_width=64, resized_height=32, left=16, top=0, size=32
    )
    m = np.ones((32, 32), np.float32)
    full = project_to_original(m, geo)
    assert full.shape == (50, 100)
    assert full[:, 30:70].min() > 0.99 and full[:, :20].max() < 0.01

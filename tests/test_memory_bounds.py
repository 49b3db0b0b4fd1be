"""Peak memory of `spade-run` per image is bounded (issue 11, defect 2; docs/reliability.md).

Each worst case of its class (extreme aspect, 100 Mpx 1-bit, 64 Mpx RGBA, 64 Mpx float that
needs clipping, 81 Mpx 16-bit, 81 Mpx JPEG) is scored with overlays and masks by a real
`spade-run` process (Lite0, a 209-image gallery); the child's peak RSS (ru_maxrss, read by a
wrapper process so other tests' children never count) must stay under 1 GiB. The child runs
under RLIMIT_AS 6 GiB so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LIMIT_MIB = 1024

_WRAPPER = """
import resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
sys.stdout.write(f"{p.returncode} {peak:.0f}\\n" + p.stdout)
sys.stderr.write(p.stderr)
"""


@pytest.fixture(scope="module")
def gallery209(lite0_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gallery of 209 images' worth of (random fp16) Lite0 features: the size of bottle's."""
    from spade_edge.runtime.gallery import write_gallery
    from spade_edge.runtime.runners import open_runner

    runner = open_runner(lite0_onnx, "ort")
    c, fp = runner.contract, runner.fingerprint
    runner.close()
    n, rng = 209, np.random.default_rng(0)
    pooled = rng.random((n, c.pooled_dim), dtype=np.float32)
    levels = [rng.random((n, lv.height, lv.width, lv.channels), np.float32) for lv in c.levels]
    sources = [{"name": f"train/{i:03d}.png", "sha256": f"{i:064x}"} for i in range(n)]
    g = tmp_path_factory.mktemp("g209") / "g.bin"
    write_gallery(g, c, fp, pooled, levels, sources)
    return g


def _worst_case(kind: str, path: Path) -> None:
    if kind == "strip":
        Image.new("RGB", (1, 20000), (90, 120, 200)).save(path)
    elif kind == "bits":
        Image.new("1", (9999, 9999), 1).save(path)
    elif kind == "rgba":
        Image.new("RGBA", (8000, 8000), (120, 130, 140, 255)).save(path, compress_level=1)
    elif kind == "float":  # values above 255: the clipping copy is made
        Image.fromarray(np.full((8000, 8000), 300.0, np.float32), mode="F").save(
            path, compression="tiff_adobe_deflate"
        )
    elif kind == "u16":
        Image.new("I;16", (9000, 9000), 30000).save(path, compress_level=1)
    elif kind == "jpeg":
        Image.new("RGB", (9000, 9000), (120, 130, 140)).save(path, quality=90)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("strip", "strip.png"),
        ("bits", "bits.png"),
        ("rgba", "rgba.png"),
        ("float", "float.tif"),
        ("u16", "u16.png"),
        ("jpeg", "big.jpg"),
    ],
)
def test_spade_run_peak_rss_per_image(
    lite0_onnx: Path, gallery209: Path, tmp_path: Path, kind: str, name: str
) -> None:
    img = tmp_path / name
    _worst_case(kind, img)
    exe = Path(sys.executable).with_name("spade-run")
    argv = [str(exe), str(lite0_onnx), str(gallery209), str(img), "--out", str(tmp_path / "o")]
    argv += ["--threshold", "5", "--pixel-threshold", "40"]
    p = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, timeout=600
    )
    head, _, rest = p.stdout.partition("\n")
    rc, peak = (int(x) for x in head.split())
    print(f"{name}: exit {rc}, peak RSS {peak} MiB")  # the figure for the notes (pytest -s)
    assert "Traceback" not in p.stderr, p.stderr
    assert peak <= LIMIT_MIB, f"{name}: peak RSS {peak} MiB"
    rec = json.loads(rest.strip().splitlines()[-1])
    if kind == "strip":  # refused up front, with a clear line, the run goes on
        assert rc != 0 and "aspect ratio" in rec["error"]
        return
    assert rc == 0, p.stderr
    assert np.isfinite(rec["score"])
    ov = Image.open(rec["overlay"])
    assert ov.width * ov.height <= 16_000_000
    assert Image.open(rec["mask"]).size == ov.size

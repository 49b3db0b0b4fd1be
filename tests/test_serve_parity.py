"""POST /v1/inspect gives the numbers spade-run prints for the same file (Lite0, real bottles)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx`")
    from fastapi.testclient import TestClient

from spade_edge.serve import ServeConfig, create_app

FIELDS = ("score", "threshold", "anomalous", "map_max", "pixel_threshold", "defect_fraction")


@pytest.mark.slow
def test_inspect_equals_spade_run_json(lite0_onnx: Path, bottle_dir: Path, tmp_path: Path) -> None:
    from spade_edge.runtime.packer import pack

    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:24]
    gallery = tmp_path / "g.bin"
    pack(lite0_onnx, train, gallery, progress=False)  # thresholds included
    images = [
        *sorted((bottle_dir / "test" / "good").glob("*.png"))[:2],
        *sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:2],
        *sorted((bottle_dir / "test" / "contamination").glob("*.png"))[:1],
    ]
    full = bottle_dir.parent.parent / "mvtec_ad_fullres" / "bottle" / "test" / "broken_large"
    images += sorted(full.glob("*.png"))[:1]  # 900 px: resize + crop projection on the original
    out = tmp_path / "run.jsonl"
    exe = Path(sys.executable).with_name("spade-run")
    r = subprocess.run(
        [str(exe), str(lite0_onnx), str(gallery), *map(str, images), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    expected = {rec["image"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    cfg = ServeConfig(model=lite0_onnx, gallery=gallery, archive=tmp_path / "archive")
    with TestClient(create_app(cfg)) as c:
        verdicts = set()
        for img in images:
            res = c.post("/v1/inspect", content=img.read_bytes()).json()
            want = expected[str(img)]
            for f in FIELDS:
                assert res[f] == want[f], (img.name, f, res[f], want[f])
            verdicts.add(res["anomalous"])
            if res["anomalous"]:
                assert res["regions"], img
                w, h = (900, 900) if img.is_relative_to(full) else (256, 256)
                for reg in res["regions"]:
                    assert 0 <= reg["x"] < reg["x"] + reg["w"] <= w
                    assert 0 <= reg["y"] < reg["y"] + reg["h"] <= h
                    assert reg["peak"] >= res["pixel_threshold"]
        assert verdicts == {True, False}

"""The protocol's reference figures on real data (MVTec AD bottle, EfficientNet-Lite0, K=5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spade_edge.runtime.metrics import aupro

pytestmark = pytest.mark.slow
REFERENCE_K5 = {"image_auroc": 0.9937, "pixel_auroc": 0.9748, "aupro": 0.9386}


def test_bottle_k5_matches_reference(lite0_onnx: Path, bottle_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spade_edge.cli.eval import app

    out = tmp_path / "report.json"
    r = CliRunner().invoke(
        app, [str(lite0_onnx), str(bottle_dir), "--k", "5", "--far", "0", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["n_train"] == 209 and report["n_test"] == 83
    for key, ref in REFERENCE_K5.items():
        assert abs(report[key] - ref) <= 0.005, (key, report[key], ref)


def test_aupro_by_definition_on_a_tiny_case() -> None:
    # one image, a 2-pixel region and 2 normal pixels; region scores .9 .4, normal .5 .1
    masks = np.array([[[True, True, False, False]]])
    maps = np.array([[[0.9, 0.4, 0.5, 0.1]]])
    # thresholds (descending): 0.9 -> PRO .5 FPR 0; 0.5 -> PRO .5 FPR .5; 0.4 -> PRO 1 FPR .5;
    # at FPR 0.3 the curve (0,0)->(0,.5)->(.5,.5) gives PRO .5: area .5*.3 /.3 = .5
    assert aupro(masks, maps, 0.3) == pytest.approx(0.5)
    # whole curve: (0,0) (0,.5) (.5,.5) (.5,1) (1,1) -> area .5*.5 + .5*1 = .75
    assert aupro(masks, maps, 1.0) == pytest.approx(0.75)

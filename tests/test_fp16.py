"""fp16 conversion: fp32 I/O kept, ORT CPU parity with the parent, metadata, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spade_edge.calibration import fp16 as fp16_mod
from spade_edge.calibration.derive import parity
from spade_edge.calibration.fp16 import convert_fp16, fp16_block_list
from spade_edge.calibration.lineage import graph_fingerprint, read_lineage, relative_error
from spade_edge.runtime.errors import ExportError, FormatError, InputError
from spade_edge.runtime.model_meta import read_model_info
from spade_edge.runtime.preprocess import prepare_path

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")

#: The issue's parity bound for fp16 vs fp32 in ORT CPU (rel = max|a-b| / max|b| per output).
#: Met by the tiny model and by Lite0 on a random batch; Lite0 on real bottle images reaches
#: 1.3e-2 (weight rounding, docs/precision.md), so that test uses LITE0_REAL_RTOL.
FP16_RTOL = 5e-3
LITE0_REAL_RTOL = 2e-2


def _images(folder: Path, n: int, size: int = 40) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([128 + 90 * np.sin(5 * xx), 60 + 150 * yy, 128 + 0 * xx], axis=2)
    for i in range(n):
        img = np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder


def test_fp16_parity_and_io(tiny_onnx: Path, tmp_path: Path):
    dst = tmp_path / "tiny.fp16.onnx"
    assert convert_fp16(tiny_onnx, dst) == dst
    m = onnx.load(str(dst))
    f16 = onnx.TensorProto.FLOAT16
    assert any(i.data_type == f16 for i in m.graph.initializer)  # weights really are fp16
    fp32 = onnx.TensorProto.FLOAT
    for vi in [*m.graph.input, *m.graph.output]:  # fp32 I/O kept
        assert vi.type.tensor_type.elem_type == fp32, vi.name
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32), dtype=np.float32)
    rel = parity(tiny_onnx, dst, x)
    assert max(rel.values()) < FP16_RTOL, rel
    assert min(rel.values()) > 0  # not the fp32 graph in disguise


def test_fp16_metadata(tiny_onnx: Path, tmp_path: Path):
    parent = read_model_info(tiny_onnx)
    dst = convert_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx")
    info = read_model_info(dst)
    assert info.contract.precision == "fp16"
    assert info.contract.parent_fingerprint == parent.fingerprint
    assert info.fingerprint == graph_fingerprint(onnx.load(str(dst))) != parent.fingerprint
    assert info.contract.levels == parent.contract.levels
    assert "ReduceMean" in info.contract.extra["fp16"]["fp32_ops"]
    lin = read_lineage(info.metadata)
    # no normal images given: the check did not run, so no gallery reuse
    assert lin is not None and lin.check["run"] is False
    assert not lin.passed and not lin.gallery_compatible
    assert max(lin.tool["parity_random_batch"].values()) < FP16_RTOL


def test_fp16_with_check_images(tiny_onnx: Path, tmp_path: Path):
    dst = convert_fp16(tiny_onnx, tmp_path / "f.onnx", check_dir=_images(tmp_path / "good", 24))
    lin = read_lineage(read_model_info(dst).metadata)
    assert lin.check["run"] is True and lin.check["queries"] == 8
    assert lin.check["reference"] == 16
    assert lin.passed and lin.gallery_compatible, lin.check["failed"]
    assert lin.check["min_cosine"] > 0.999


def test_fp16_parity_failure_writes_nothing(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(fp16_mod, "FP16_GUARD_RTOL", 0.0)  # no fp16 model can meet 0
    dst = tmp_path / "out" / "tiny.fp16.onnx"
    with pytest.raises(ExportError, match="parity"):
        convert_fp16(tiny_onnx, dst)
    assert not dst.exists()
    assert list(dst.parent.iterdir()) == []  # no temp file or check folder left behind


def test_fp16_refusals(tiny_onnx: Path, tmp_path: Path):
    plain = onnx.load(str(tiny_onnx))
    del plain.metadata_props[:]
    p = tmp_path / "plain.onnx"
    onnx.save(plain, str(p))
    with pytest.raises(FormatError, match="not a spade-edge model"):
        convert_fp16(p, tmp_path / "x.onnx")
    half = convert_fp16(tiny_onnx, tmp_path / "half.onnx")
    with pytest.raises(InputError, match="already a fp16"):
        convert_fp16(half, tmp_path / "x.onnx")
    with pytest.raises(InputError, match="not found"):
        convert_fp16(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_block_list_keeps_resize_and_reducemean():
    blocked = fp16_block_list(["Softmax"])
    assert {"Resize", "ReduceMean", "Softmax"} <= set(blocked)


def test_relative_error_is_max_abs_diff_over_parent_scale():
    """The parity measure behind these tests and the conversion guard, on known numbers."""
    parent = np.array([[1.0, -4.0], [2.0, 0.5]], np.float32)
    derived = np.array([[1.5, -4.0], [2.0, 0.0]], np.float32)
    assert relative_error(derived, parent) == pytest.approx(0.5 / 4.0)
    assert relative_error(parent, parent) == 0.0
    zero = np.zeros(3, np.float32)  # all-zero parent: the absolute deviation, not 0
    assert relative_error(np.array([0.0, 0.25, 0.0], np.float32), zero) == 0.25


@pytest.mark.slow
def test_lite0_fp16_bottle(lite0_onnx: Path, bottle_dir: Path, tmp_path: Path):
    """Real backbone: random-batch parity within FP16_RTOL, real images within LITE0_REAL_RTOL."""
    dst = convert_fp16(
        lite0_onnx, tmp_path / "lite0.fp16.onnx", check_dir=bottle_dir / "train" / "good"
    )
    contract = read_model_info(lite0_onnx).contract
    paths = sorted((bottle_dir / "test").rglob("*.png"))[::20][:4]
    x = np.stack([prepare_path(p, contract).tensor for p in paths])
    rel = parity(lite0_onnx, dst, x)
    assert max(rel.values()) < LITE0_REAL_RTOL, rel
    lin = read_lineage(read_model_info(dst).metadata)
    assert max(lin.tool["parity_random_batch"].values()) < FP16_RTOL
    assert lin.passed and lin.gallery_compatible, lin.check["failed"]

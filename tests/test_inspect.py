"""spade-inspect: picks the artifact kind by magic and prints headers (tables or JSON)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from spade_edge.cli import inspect as insp
from spade_edge.runtime.container import write_container
from spade_edge.runtime.errors import FormatError
from spade_edge.runtime.gallery import write_gallery

FP = hashlib.sha256(b"m").hexdigest()


def _cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["spade-inspect", *args])
    try:
        insp.main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    from make_golden import golden_inputs

    p = tmp_path / "g.bin"
    write_gallery(p, **golden_inputs())
    return p


def test_gallery_json(gallery: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _cli(monkeypatch, str(gallery), "--json", "--verify") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "gallery" and info["n_images"] == 2 and info["verified"] is True
    assert info["levels"] == [{"name": "layer1", "stride": 4, "shape": [2, 2, 3]}]
    assert info["blobs"]["level0"] == {"dtype": "<f2", "shape": [2, 2, 2, 3], "nbytes": 48}
    payload = sum(b["nbytes"] for b in info["blobs"].values())
    assert info["payload_bytes"] == payload and info["bytes_per_image"] == payload // 2
    assert info["file_bytes"] == gallery.stat().st_size
    assert info["sources"]["count"] == 2 and info["thresholds"] == {"image": 0.5}


def test_gallery_table(gallery: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _cli(monkeypatch, str(gallery)) == 0
    out = capsys.readouterr().out
    assert "gallery" in out and "n_images" in out and "pooled_sqnorms" in out


def test_verify_catches_corruption(gallery: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(gallery.read_bytes())
    data[-1] ^= 1  # last byte of the last blob
    gallery.write_bytes(bytes(data))
    assert _cli(monkeypatch, str(gallery), "--json") == 0  # headers alone look fine
    capsys.readouterr()
    assert _cli(monkeypatch, str(gallery), "--verify") == 3
    assert "corrupt" in capsys.readouterr().err


def test_onnx_model(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _cli(monkeypatch, str(tiny_onnx), "--json", "--verify") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "onnx" and info["backbone"] == "tiny"
    assert info["levels"][0] == {"name": "layer1", "stride": 4, "shape": [8, 8, 12]}
    assert len(info["model_fingerprint"]) == 64


def test_onnx_verify_detects_edited_graph(tiny_onnx: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    m = onnx.load(str(tiny_onnx))
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[0, 0, 0, 0] += 1.0
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    edited = tmp_path / "edited.onnx"
    onnx.save(m, str(edited))
    insp.inspect_file(edited)  # metadata alone still reads
    with pytest.raises(FormatError, match="does not match the recorded"):
        insp.inspect_file(edited, verify=True)


def test_engine_uses_engine_module_describe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "m.engine"
    write_container(p, b"SPADEENG", 1, {"anything": 1}, {"plan": b"xyz"})
    seen = {}

    def fake_describe(path, verify=False):  # type: ignore[no-untyped-def]
        seen["args"] = (Path(path), verify)
        return {"kind": "engine", "path": str(path), "tensorrt_version": "10.3"}

    import spade_edge.runtime.engine_file as ef

    monkeypatch.setattr(ef, "describe", fake_describe)
    info = insp.inspect_file(p, verify=True)
    assert seen["args"] == (p, True) and info["tensorrt_version"] == "10.3"


def test_unknown_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    p = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    assert _cli(monkeypatch, str(p)) == 3
    err = capsys.readouterr().err
    assert "PNG image" in err and "x.png" in err
    assert _cli(monkeypatch, str(tmp_path / "missing.bin")) == 2

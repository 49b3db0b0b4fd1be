"""spade-triton's repository writer, the triton runner's address parsing, the CLI's bad input.

No server here (tests/test_triton_server.py talks to a real tritonserver).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_support import make_gallery
from typer.testing import CliRunner

from spade_edge.cli.triton import app as triton_app
from spade_edge.cli.triton import parse_gpus
from spade_edge.runtime.errors import BackendUnavailableError, CompatibilityError, InputError
from spade_edge.runtime.runners.triton import parse_url, split_model_address
from spade_edge.triton.repository import RepoOptions, spade_config, versions, write_repository


@pytest.fixture()
def pair(tiny_onnx: Path, tmp_path: Path) -> tuple[Path, Path]:
    return tiny_onnx, make_gallery(tiny_onnx, tmp_path / "g")


def test_repository_layout_and_config(pair: tuple[Path, Path], tmp_path: Path) -> None:
    model, gallery = pair
    repo = tmp_path / "repo"
    wv = write_repository(model, gallery, repo, RepoOptions(instances=2, max_batch_size=4))
    assert wv.version == 1 and wv.backbone_version == 1
    v1 = repo / "spade" / "1"
    names = {p.name for p in v1.iterdir()}
    assert {"model.py", "model.onnx", "gallery.bin", "spade.json", "site"} <= names
    assert (v1 / "gallery.bin").read_bytes() == gallery.read_bytes()
    assert (v1 / "model.onnx").read_bytes() == model.read_bytes()
    assert (v1 / "site" / "spade_edge" / "runtime" / "detector.py").is_file()
    assert [p.name for p in (v1 / "site" / "spade_edge").iterdir()] == ["runtime"]
    assert not list((v1 / "site").rglob("__pycache__"))
    man = json.loads((v1 / "spade.json").read_text())
    assert man["cpu"] == {"backend": "ort", "matcher": "numpy"}
    assert man["gpu"]["matcher"] == "cuda" and man["k_image"] == 3 and man["gallery_images"] == 12
    assert man["gpu"]["backend"] == "ort-gpu"  # no --engine: ONNX Runtime's CUDA provider
    cfg = (repo / "spade" / "config.pbtxt").read_text()
    assert 'name: "spade"' in cfg and 'backend: "python"' in cfg
    assert "max_batch_size: 4" in cfg and "dynamic_batching" in cfg
    assert "count: 2 kind: KIND_CPU" in cfg
    assert '{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }' in cfg
    assert '{ name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }' in cfg
    assert '{ name: "ANOMALOUS" data_type: TYPE_INT8 dims: [ 1 ] }' in cfg
    assert '{ name: "ANOMALY_MAP" data_type: TYPE_FP32 dims: [ 32, 32 ] }' in cfg
    bb = (repo / "spade_backbone" / "config.pbtxt").read_text()
    assert '{ name: "image" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }' in bb
    assert '"spade_fingerprint"' in bb and '"spade_contract"' in bb


def test_backend_override_goes_to_the_instances_kind(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    wv = write_repository(*pair, tmp_path / "r", RepoOptions(backend="openvino"))
    man = json.loads((wv.folder / "spade.json").read_text())
    assert man["cpu"]["backend"] == "openvino" and man["gpu"]["backend"] == "ort-gpu"
    with pytest.raises(InputError, match="--engine"):
        write_repository(*pair, tmp_path / "r2", RepoOptions(kind="gpu", backend="trt"))


def test_gpu_instances_config(pair: tuple[Path, Path]) -> None:
    from tiny_model import tiny_contract

    cfg = spade_config(tiny_contract(32), RepoOptions(kind="gpu", instances=3, gpus=(0, 1)))
    assert "instance_group [ { count: 3 kind: KIND_GPU gpus: [ 0, 1 ] } ]" in cfg


def test_next_version_and_immutable_versions(pair: tuple[Path, Path], tmp_path: Path) -> None:
    model, gallery = pair
    repo = tmp_path / "repo"
    write_repository(model, gallery, repo, RepoOptions())
    g2 = make_gallery(model, tmp_path / "g2", n=10)
    wv = write_repository(model, g2, repo, RepoOptions())
    assert wv.version == 2 and versions(repo / "spade") == [1, 2]
    assert wv.backbone_version == 1  # same model: the backbone keeps its version
    assert (repo / "spade" / "2" / "gallery.bin").read_bytes() == g2.read_bytes()
    with pytest.raises(InputError, match="version 1 exists"):
        write_repository(model, gallery, repo, RepoOptions(version=1))
    assert not [p for p in (repo / "spade").iterdir() if p.name.startswith(".tmp")]


def test_gallery_of_another_model_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from tiny_model import make_tiny_model

    _, gallery = pair
    other = make_tiny_model(tmp_path / "other.onnx", image_size=32, seed=1)
    with pytest.raises(CompatibilityError):
        write_repository(other, gallery, tmp_path / "repo", RepoOptions())
    assert not (tmp_path / "repo" / "spade" / "1").exists()


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (RepoOptions(kind="tpu"), "--kind"),
        (RepoOptions(instances=0), "--instances"),
        (RepoOptions(gpus=(0,)), "--gpus needs --kind gpu"),
        (RepoOptions(max_batch_size=0), "--max-batch-size"),
        (RepoOptions(backend="triton"), "--backend"),
        (RepoOptions(backend="nope"), "--backend"),
    ],
)
def test_bad_options(
    pair: tuple[Path, Path], tmp_path: Path, opts: RepoOptions, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        write_repository(*pair, tmp_path / "repo", opts)


def test_cli_writes_a_version_and_reports_json(pair: tuple[Path, Path], tmp_path: Path) -> None:
    model, gallery = pair
    r = CliRunner().invoke(triton_app, [str(model), str(gallery), "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["version"] == 1 and Path(rec["folder"]).is_dir()


def test_cli_bad_input_is_one_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    model, _ = pair
    cmd = [sys.executable, "-m", "spade_edge.cli.triton", str(model), str(tmp_path / "nope.bin")]
    r = subprocess.run([*cmd, "-o", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "nope.bin" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(InputError, match="--gpus"):
        parse_gpus("0,x")


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("127.0.0.1:8001", ("grpc", "127.0.0.1:8001")),
        ("grpc://localhost:8001", ("grpc", "localhost:8001")),
        ("http://127.0.0.1:8000/", ("http", "127.0.0.1:8000")),
    ],
)
def test_parse_url(url: str, want: tuple[str, str]) -> None:
    assert parse_url(url) == want


@pytest.mark.parametrize("url", ["localhost", "ftp://h:1", "h:port", ":8001"])
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(InputError):
        parse_url(url)


def test_triton_runner_without_tritonclient_says_how_to_install() -> None:
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tritonclient is installed here")
    from spade_edge.runtime.runners import open_runner

    with pytest.raises(BackendUnavailableError, match=r"spade-edge\[triton\]"):
        open_runner("spade_backbone", "triton", url="127.0.0.1:1")


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("spade_backbone", (None, "spade_backbone")),
        ("127.0.0.1:8001/spade_backbone", ("127.0.0.1:8001", "spade_backbone")),
        (str(Path("grpc://h:8001/bb")), ("grpc://h:8001", "bb")),  # Path("a://b") -> "a:/b"
        ("http://h:8000/spade_backbone/", ("http://h:8000", "spade_backbone")),
    ],
)
def test_model_address_in_a_path(path: str, want: tuple[str | None, str]) -> None:
    assert split_model_address(path) == want

"""The command layer (issue 11 defects 1, 5, 8, 10, 12, 15, 16): usage errors, validators,
output checks before the work, rich markup in user data, exit codes, non-UTF-8 names."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from spade_edge.cli import app as spade
from spade_edge.cli import inspect as insp
from spade_edge.cli import pack as pack_cli
from spade_edge.cli import run as run_cli
from spade_edge.runtime.errors import BackendUnavailableError
from spade_edge.runtime.records import image_path

runner = CliRunner()

#: every console script and the command it runs (pyproject [project.scripts])
SCRIPTS = {
    "spade-export": "spade_edge.cli.export",
    "spade-pack": "spade_edge.cli.pack",
    "spade-threshold": "spade_edge.cli.threshold",
    "spade-run": "spade_edge.cli.run",
    "spade-eval": "spade_edge.cli.eval",
    "spade-bench": "spade_edge.cli.bench",
    "spade-inspect": "spade_edge.cli.inspect",
    "spade-demo": "spade_edge.cli.demo",
    "spade-triton": "spade_edge.cli.triton",
    "spade-serve": "spade_edge.cli.serve",
    "spade": "spade_edge.cli.app",
}


def _images(folder: Path, n: int, seed: int = 0, name: str = "img_{:02d}.png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = np.full((48, 40, 3), 120, np.uint8) + rng.integers(0, 20, (48, 40, 3), dtype=np.uint8)
        p = folder / name.format(i)
        Image.fromarray(a).save(p)
        out.append(p)
    return out


@pytest.fixture()
def packed(tiny_onnx: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model and a 12-image gallery with thresholds, made by `spade pack`."""
    g = tmp_path / "g.bin"
    train = _images(tmp_path / "train", 12)
    r = runner.invoke(spade.app, ["pack", str(tiny_onnx), str(train[0].parent), "-o", str(g)])
    assert r.exit_code == 0, r.output
    return tiny_onnx, g


def _no_click(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in a subprocess where `import click` fails, as in a wheel install (typer
    vendors its own click; the dev venv has click only through import-linter)."""
    code = (
        "import sys; sys.modules['click'] = None\n"
        f"sys.argv = [{script!r}, *sys.argv[1:]]\n"
        f"from {SCRIPTS[script]} import main\n"
        "sys.exit(main())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


# ---------------------------------------------------------------- defect 1: usage errors


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_unknown_option_is_a_usage_error_without_click(script: str) -> None:
    p = _no_click(script, "--no-such-option")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "No such option" in p.stderr
    assert "Usage:" in p.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["spade-pack"],  # no arguments at all
        ["spade-run", "M", "G", "img.png", "--k", "abc"],
        ["spade-pack", "M", "dir", "-o", "x.bin", "--batch-size", "0"],
        ["spade-threshold", "G", "--k", "0"],
        ["spade-run", "M", "G", "img.png", "--threshold", "nan"],
        ["spade", "pack", "M", "dir", "-o", "x.bin", "--far", "nan"],
        ["spade", "no-such-command"],
    ],
)
def test_bad_values_are_usage_errors_without_click(args: list[str], tmp_path: Path) -> None:
    p = _no_click(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Usage:" in p.stderr


def test_spade_help_lists_every_command() -> None:
    r = runner.invoke(spade.app, ["--help"])
    assert r.exit_code == 0
    for name in spade.COMMANDS:
        assert name in r.output
    assert len(r.output.splitlines()) < 40  # one screen


# ---------------------------------------------------------------- defects 8 and 15: validators


@pytest.mark.parametrize(
    "args",
    [
        ["--threshold", "nan"],
        ["--threshold", "inf"],
        ["--threshold", "-1"],
        ["--pixel-threshold", "nan"],
        ["--pixel-threshold", "-inf"],
        ["--k", "0"],
        ["--k-image", "-3"],
        ["--batch-size", "0"],
    ],
)
def test_run_refuses_bad_numbers_before_loading(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_cli.Detector, "load", _must_not_run)
    r = runner.invoke(run_cli.app, ["M", "G", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert args[0] in r.output


@pytest.mark.parametrize("far", ["nan", "-1", "1", "inf"])
def test_pack_refuses_bad_far_before_inference(
    far: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack_cli, "pack", _must_not_run)
    r = runner.invoke(spade.app, ["pack", "M", str(tmp_path), "-o", "g.bin", "--far", far])
    assert r.exit_code == 2 and "--far" in r.output, r.output


@pytest.mark.parametrize("args", [["--k", "0"], ["--far", "nan"], ["--far", "0"], ["--far", "-1"]])
def test_threshold_refuses_bad_options(args: list[str], packed: tuple[Path, Path]) -> None:
    _, g = packed
    before = g.read_bytes()
    r = runner.invoke(spade.app, ["threshold", str(g), *args])
    assert r.exit_code == 2, r.output
    assert g.read_bytes() == before


def test_run_json_is_strict(packed: tuple[Path, Path], tmp_path: Path) -> None:
    model, g = packed
    img = _images(tmp_path / "q", 1, seed=5)[0]
    r = runner.invoke(run_cli.app, [str(model), str(g), str(img), "--threshold", "0"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.splitlines()[0], parse_constant=_no_constants)
    assert rec["anomalous"] is True  # threshold 0: every part is flagged


def _no_constants(name: str) -> None:
    raise AssertionError(f"non-strict JSON constant {name}")


def _must_not_run(*_a: object, **_k: object) -> None:
    raise AssertionError("the work started before the options were checked")


# ---------------------------------------------------------------- defect 12: outputs first


@pytest.mark.parametrize("opt", ["--json", "--csv"])
def test_run_checks_report_paths_before_scoring(
    opt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_cli.Detector, "load", _must_not_run)
    img = _images(tmp_path / "q", 1)[0]
    r = runner.invoke(run_cli.app, ["M", "G", str(img), opt, str(tmp_path / "nodir" / "r.x")])
    assert r.exit_code == 2 and "nodir" in r.output and opt in r.output, r.output
    r = runner.invoke(run_cli.app, ["M", "G", str(img), opt, str(tmp_path)])  # a folder
    assert r.exit_code == 2 and "folder" in r.output, r.output


def test_run_out_folder_blocked_by_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_cli.Detector, "load", _must_not_run)
    img = _images(tmp_path / "q", 1)[0]
    (tmp_path / "file").write_text("x")
    r = runner.invoke(run_cli.app, ["M", "G", str(img), "--out", str(tmp_path / "file" / "maps")])
    assert r.exit_code == 2 and "--out" in r.output, r.output


def test_pack_checks_output_before_inference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack_cli, "pack", _must_not_run)
    r = runner.invoke(spade.app, ["pack", "M", str(tmp_path), "-o", str(tmp_path / "no/g.bin")])
    assert r.exit_code == 2 and "no/g.bin" in r.output, r.output


def test_threshold_checks_output_before_the_work(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, g = packed
    r = runner.invoke(spade.app, ["threshold", str(g), "-o", str(tmp_path / "nodir" / "t.bin")])
    assert r.exit_code == 2 and "nodir" in r.output, r.output
    assert "leave-one-out" not in r.output


# ---------------------------------------------------------------- defect 5: markup in user data


@pytest.mark.parametrize("name", ["[/x].bin", "part[red].bin", "[bold]b[/bold].bin"])
def test_inspect_prints_names_literally(name: str, tmp_path: Path) -> None:
    p = tmp_path / name  # "[/x]": a folder "[" holding "x].bin"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"not an artifact at all")
    r = runner.invoke(insp.app, [str(p)])
    assert r.exit_code == 3, r.output
    assert name in r.output.replace("\n", "")


def test_run_error_lines_keep_brackets(packed: tuple[Path, Path], tmp_path: Path) -> None:
    model, g = packed
    folder = tmp_path / "q["  # its files' paths contain "[/"
    _images(folder, 1)
    (folder / "part[red].png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "x].png").write_bytes(b"garbage")
    r = runner.invoke(run_cli.app, [str(model), str(g), str(folder)])
    err = r.stderr.replace("\n", "")
    assert "part[red].png" in err and "q[/x].png" in err, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_backend_hint_keeps_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_trt(*_a: object, **_k: object) -> None:
        raise BackendUnavailableError("TensorRT missing: pip install 'spade-edge[trt]'")

    monkeypatch.setattr(run_cli.Detector, "load", no_trt)
    r = runner.invoke(run_cli.app, ["M", "G", str(_images(tmp_path, 1)[0])])
    assert r.exit_code == BackendUnavailableError.exit_code
    assert "pip install 'spade-edge[trt]'" in r.stderr


# ---------------------------------------------------------------- defect 16: exit codes


def test_decode_failure_is_exit_2_after_scoring_the_rest(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    model, g = packed
    folder = tmp_path / "q"
    good = _images(folder, 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "r.jsonl"
    r = runner.invoke(run_cli.app, [str(model), str(g), str(folder), "--json", str(out)])
    assert r.exit_code == 2, r.output  # README: 2 = input
    recs = {Path(x["image"]).name: x for x in map(json.loads, out.read_text().splitlines())}
    assert all("score" in recs[p.name] for p in good)
    assert "error" in recs["broken.png"]
    assert "1 of 3 images failed" in r.stderr


def test_ctrl_c_prints_a_line_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_cli.Detector, "load", interrupted)
    r = runner.invoke(run_cli.app, ["M", "G", str(_images(tmp_path, 1)[0])])
    assert r.exit_code == 130
    assert "interrupted" in r.stderr


def test_ctrl_c_in_a_real_process(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from spade_edge.cli import run\n"
        "def stop(*a, **k):\n    raise KeyboardInterrupt\n"
        "run.Detector.load = stop\n"
        f"sys.argv = ['spade-run', 'M', 'G', {str(_images(tmp_path, 1)[0])!r}]\n"
        "sys.exit(run.main())\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and "interrupted" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------- defect 10: non-UTF-8 names


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_run_reports_non_utf8_names_losslessly(packed: tuple[Path, Path], tmp_path: Path) -> None:
    model, g = packed
    folder = tmp_path / "q"
    src = _images(folder, 1)[0]
    raw = os.fsencode(folder) + b"/caf\xe9[red].png"  # Latin-1 bytes: not UTF-8
    os.rename(src, raw)
    js, cs = tmp_path / "r.jsonl", tmp_path / "r.csv"
    r = runner.invoke(
        run_cli.app, [str(model), str(g), str(folder), "--json", str(js), "--csv", str(cs)]
    )
    assert r.exit_code == 0, r.output
    rec = json.loads(js.read_bytes().decode("utf-8"), parse_constant=_no_constants)
    assert "score" in rec
    assert image_path(rec) == raw  # the record format is runtime/records.py's
    rows = list(csv.DictReader(io.StringIO(cs.read_bytes().decode("utf-8"))))  # strict UTF-8
    assert image_path(rows[0]) == raw and rows[0]["score"] == str(rec["score"])

"""Property test over the command surface (issue 11, "beyond the list").

Random argument vectors drawn from each command's options, with valid and invalid values and
with paths that exist, do not exist, or cannot be read (tests run as root, so "unreadable" is a
folder where a file is expected, a path under a file, a symlink loop, garbage bytes), never end
in a traceback and always exit with a documented code (README *CLI reference*).

Most examples run in-process through typer's CliRunner (fast); a small sample runs the real
console entry point in a subprocess. Commands whose valid runs take minutes (demo: a Lite0
export; bench: micro-benchmarks; serve: a server) are drawn with at least one bad value, so
every example stays short. Bounded: 220 in-process + 5 subprocess examples, derandomized
(the same vectors on every run): about 20 s of CPU time.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
import typer
import typer.main
import typer.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from spade_edge.cli import app as spade

#: every exit code a command may end with (README: CLI reference; 130 = Ctrl-C is not drawn)
DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 7, 8}

INTS = ["1", "2", "3", "5", "0", "-1", "abc", "99999", "1.5", ""]
COMMANDS = ["run", "pack", "threshold", "inspect", "eval", "export", "bench", "demo", "triton"]
FLOATS = ["0", "0.01", "0.2", "1", "-1", "nan", "inf", "-inf", "abc", "1e308"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, a gallery with thresholds, images, an MVTec-layout folder, bad paths."""
    from tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("world")
    model = make_tiny_model(root / "tiny.onnx", image_size=32)
    rng = np.random.default_rng(0)

    def image(path: Path, mask: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if mask:
            a = np.zeros((48, 40), np.uint8)
            a[10:20, 10:20] = 255
        else:
            a = np.full((48, 40, 3), 120, np.uint8) + rng.integers(0, 20, (48, 40, 3), np.uint8)
        Image.fromarray(a).save(path)
        return path

    for i in range(12):
        image(root / "good" / f"g{i:02d}.png")
        image(root / "mvtec" / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        image(root / "mvtec" / "test" / "good" / f"{i:03d}.png")
        image(root / "mvtec" / "test" / "crack" / f"{i:03d}.png")
        image(root / "mvtec" / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask=True)
    gallery = root / "g.bin"
    r = CliRunner().invoke(spade.app, ["pack", str(model), str(root / "good"), "-o", str(gallery)])
    assert r.exit_code == 0, r.output
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "afile").write_text("x")
    (root / "loop").symlink_to(root / "loop")
    (root / "dangling").symlink_to(root / "nowhere")
    weird = root / "weird[" / "x][red].png"  # rich markup in the path
    image(weird)
    raw = os.fsencode(root) + b"/caf\xe9.png"  # not UTF-8
    shutil.copy(root / "good" / "g00.png", raw)
    return {
        "model": model,
        "gallery": gallery,
        "image": root / "good" / "g00.png",
        "images": root / "good",
        "mvtec": root / "mvtec",
        "garbage": root / "garbage.png",
        "missing": root / "missing.png",
        "dir_as_file": root / "good",
        "under_file": root / "afile" / "x.png",
        "loop": root / "loop",
        "dangling": root / "dangling",
        "weird": weird,
        "non_utf8": Path(os.fsdecode(raw)),
        "root": root,
    }


def _in_paths(w: dict[str, Path]) -> st.SearchStrategy[str]:
    keys = [k for k in w if k != "root"]
    return st.sampled_from(keys).map(lambda k: str(w[k]))


def _out_paths(scratch: Path, w: dict[str, Path]) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            str(scratch / "out.bin"),
            str(scratch / "nodir" / "out.bin"),
            str(scratch),  # a folder
            str(w["under_file"]),
            str(scratch / "maps"),
        ]
    )


def _options(draw: Any, spec: dict[str, st.SearchStrategy[str] | None]) -> list[str]:
    """Draw a subset of options; None = a flag without a value."""
    names = draw(st.lists(st.sampled_from(sorted(spec)), max_size=4, unique=True))
    args: list[str] = []
    for n in names:
        args.append(n)
        if spec[n] is not None:
            args.append(draw(spec[n]))
    return args


def _argv(draw: Any, w: dict[str, Path], scratch: Path) -> list[str]:
    inp, out = _in_paths(w), _out_paths(scratch, w)
    ints, floats = st.sampled_from(INTS), st.sampled_from(FLOATS)
    model = st.one_of(st.just(str(w["model"])), inp)
    gallery = st.one_of(st.just(str(w["gallery"])), inp)
    cmd = draw(
        st.sampled_from(
            ["run", "pack", "threshold", "inspect", "eval", "export", "bench", "demo", "triton"]
        )
    )
    k_opts = {"--k": ints, "--k-image": ints, "--k-gallery": ints}
    if cmd == "run":
        pos = [draw(model), draw(gallery), *draw(st.lists(inp, min_size=1, max_size=3))]
        opts = {
            **k_opts,
            "--threshold": floats,
            "--pixel-threshold": floats,
            "--json": out,
            "--csv": out,
            "--out": out,
            "--batch-size": ints,
            "--backend": st.sampled_from(["auto", "ort", "bogus", "trt"]),
            "--matcher": st.sampled_from(["numpy", "bogus", "cuda"]),
            "--no-verify": None,
        }
        return [cmd, *pos, *_options(draw, opts)]
    if cmd == "pack":
        pos = [draw(model), *draw(st.lists(inp, min_size=1, max_size=2))]
        opts = {
            "--batch-size": ints,
            "--far": floats,
            "--add-to": gallery,
            "--skip-bad": None,
            "--skip-duplicates": None,
            "--verify": None,
            "--backend": st.sampled_from(["auto", "bogus"]),
        }
        return [cmd, *pos, "-o", draw(out), "--no-progress", *_options(draw, opts)]
    if cmd == "threshold":
        copy = scratch / "copy.bin"
        shutil.copy(w["gallery"], copy)  # spade threshold G rewrites G in place
        g = draw(st.one_of(st.just(str(copy)), inp))
        return [cmd, g, *_options(draw, {**k_opts, "--far": floats, "-o": out})]
    if cmd == "inspect":
        f = draw(st.one_of(st.sampled_from([str(w["model"]), str(w["gallery"])]), inp))
        return [cmd, f, *_options(draw, {"--verify": None, "--json": None})]
    if cmd == "eval":
        data = draw(st.one_of(st.just(str(w["mvtec"])), inp))
        opts = {
            **k_opts,
            "--far": floats,
            "--batch-size": ints,
            "--json": out,
            "--gallery": gallery,
        }
        return [cmd, draw(model), data, *_options(draw, opts)]
    if cmd == "export":
        opts = {
            "--from-onnx": model,
            "--precision": st.sampled_from(["fp32", "fp16", "int8", "fp8"]),
            "--calib-dir": inp,
            "--calib-images": ints,
            "--engine": out,
            "--max-batch": ints,
            "--image-size": ints,
            "-o": out,
        }
        # never a valid backbone: a real torch export takes far too long for a property test
        bad = ["-b", draw(st.sampled_from(["nope", "wrn", "[red]x", ""]))]
        return [cmd, *draw(st.sampled_from([bad, []])), *_options(draw, opts)]
    if cmd == "bench":
        # always one bad value: a valid run is a minutes-long micro-benchmark
        bad = draw(
            st.sampled_from(
                [
                    ["--repeats", "0"],
                    ["--k", "abc"],
                    ["--model", str(w["missing"])],
                    ["--model", str(w["garbage"])],
                    ["--json", str(w["under_file"])],
                    ["--backbone", "nope"],
                ]
            )
        )
        return [cmd, *bad, *_options(draw, {"--k": ints, "--repeats": ints, "--json": out})]
    if cmd == "demo":
        bad = draw(
            st.sampled_from(
                [["--n-normal", "3"], ["--n-normal", "abc"], ["--out", str(w["under_file"])]]
            )
        )
        return [cmd, *bad]
    opts = {
        "--instances": ints,
        "--kind": st.sampled_from(["cpu", "gpu", "bogus"]),
        "--gpus": st.sampled_from(["0", "0,0", "-1", "x"]),
        "--max-batch-size": ints,
        "--version": ints,
        "--no-bundle": None,
        "--no-backbone": None,
    }
    return [cmd, draw(model), draw(gallery), "-o", draw(out), *_options(draw, opts)]


@functools.cache
def _command() -> Any:
    """The click command of `spade`, built once: typer rebuilds it on every invoke (most of an
    in-process example's time)."""
    return typer.main.get_command(spade.app)


def _check(code: int, output: str, exception: BaseException | None, argv: list[str]) -> None:
    assert "Traceback" not in output, (argv, output)
    assert exception is None or isinstance(exception, SystemExit), (argv, repr(exception))
    assert code in DOCUMENTED, (argv, code, output)
    if code == 1:
        assert "error" in output, (argv, output)  # a failure always says what failed


@settings(
    max_examples=int(os.environ.get("CLI_PROPERTY_EXAMPLES", "220")),
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_cli_never_crashes_in_process(
    data: st.DataObject, world: dict[str, Path], tmp_path: Path
) -> None:
    scratch = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example
    argv = data.draw(st.composite(lambda draw: _argv(draw, world, scratch))())
    with patch.object(typer.testing, "_get_command", lambda _app: _command()):
        r = CliRunner().invoke(spade.app, argv)
    _check(r.exit_code, r.output, r.exception, argv)


@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_cli_never_crashes_as_a_process(
    data: st.DataObject, world: dict[str, Path], tmp_path: Path
) -> None:
    scratch = Path(tempfile.mkdtemp(dir=tmp_path))
    argv = data.draw(st.composite(lambda draw: _argv(draw, world, scratch))())
    p = subprocess.run(
        [sys.executable, "-m", "spade_edge.cli.app", *argv],
        capture_output=True,
        timeout=300,
    )
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    _check(p.returncode, out, None, argv)

"""`spade`: the whole product under one command; the `spade-*` scripts are aliases of its parts.

Each subcommand is the same function its `spade-NAME` script runs, registered from one table, so
adding a command (e.g. `serve`) is one line in ``COMMANDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from spade_edge.cli import (
    bench,
    demo,
    eval,
    export,
    inspect,
    pack,
    run,
    serve,
    threshold,
    triton,
)
from spade_edge.cli._common import make_main

#: subcommand name -> (function, one-line help). Order is the order `spade --help` shows.
COMMANDS: dict[str, tuple[Callable[..., Any], str]] = {
    "export": (export.export, "Export a backbone to ONNX (fp32/fp16/INT8) and a TensorRT engine."),
    "pack": (pack.pack_command, "Pack the features of normal images into a gallery file."),
    "threshold": (threshold.threshold, "Store anomaly thresholds computed from a gallery."),
    "run": (run.run, "Score images: score, verdict, anomaly map and overlays per image."),
    "eval": (eval.evaluate_cmd, "Image AUROC, pixel AUROC and AUPRO on MVTec-layout data."),
    "bench": (bench.bench, "Per-stage latency vs the hardware floor, or CUDA device times."),
    "inspect": (inspect.inspect_command, "Show the header of a model, gallery or engine file."),
    "triton": (triton.triton, "Write a Triton Inference Server model repository version."),
    "serve": (serve.serve, "The always-on inspection service: HTTP API, archive, live gallery."),
    "export-results": (serve.export_results, "Write a spade-serve archive's results as CSV."),
    "demo": (demo.demo, "The whole product offline on synthetic parts, in about a minute."),
}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="spade-edge: SPADE anomaly detection from export to the factory line.",
)
for _name, (_fn, _help) in COMMANDS.items():
    app.command(_name, short_help=_help)(_fn)

main = make_main(app)

if __name__ == "__main__":
    main()

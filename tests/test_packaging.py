"""Packaging promises: the runtime is lean (no torch), heavy backends load only on demand."""

from __future__ import annotations

import subprocess
import sys

LEAN_MODULES = [
    "spade_edge.runtime",
    "spade_edge.runtime.detector",
    "spade_edge.runtime.gallery",
    "spade_edge.runtime.packer",
    "spade_edge.runtime.evaluate",
    "spade_edge.runtime.runners.ort",
    "spade_edge.runtime.runners.trt",
    "spade_edge.runtime.matchers.numpy_matcher",
    "spade_edge.runtime.matchers.cuda",
    "spade_edge.runtime.matchers.exact_lowp",
    "spade_edge.runtime.autoselect",
    "spade_edge.runtime.cpu_features",
    "spade_edge.cli.run",
    "spade_edge.cli.pack",
    "spade_edge.cli.eval",
    "spade_edge.cli.inspect",
    "spade_edge.cli.bench",
    "spade_edge.cli.threshold",
    "spade_edge.cli.app",  # every command: `spade --help` loads no torch
    "spade_edge.runtime.thresholds",
]


def test_runtime_never_imports_torch_or_gpu_stacks() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LEAN_MODULES)
        + "heavy = ('torch', 'tensorrt', 'pycuda', 'onnx', 'openvino')\n"
        + "heavy = [m for m in heavy if m in sys.modules]\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"runtime imported heavy modules: {out.stdout.strip()}"


def test_backend_tables_are_the_single_source() -> None:
    from spade_edge.runtime.matchers import MATCHERS
    from spade_edge.runtime.runners import RUNNERS

    assert set(RUNNERS) == {
        "ort",
        "ort-gpu",
        "trt",
        "openvino",
        "openvino-bf16",
        "openvino-int8",
        "triton",
    }
    assert set(MATCHERS) == {"numpy", "cuda", "exact-int8", "exact-bf16"}
    for table in (RUNNERS, MATCHERS):
        for target in table.values():
            module, _, attr = target.partition(":")
            assert module.startswith("spade_edge.runtime.") and attr

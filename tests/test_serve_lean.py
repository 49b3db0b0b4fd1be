"""The lean runtime stays free of the service stack: FastAPI & co. load only with spade-serve."""

from __future__ import annotations

import subprocess
import sys

SERVICE_MODULES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "multipart", "httpx")


def test_runtime_and_detector_path_import_no_service_stack() -> None:
    code = (
        "import sys\n"
        "import spade_edge.runtime, spade_edge.runtime.detector, spade_edge.runtime.regions\n"
        "import spade_edge.runtime.packer, spade_edge.runtime.preprocess\n"
        "from spade_edge.runtime.detector import Detector\n"
        "import spade_edge.cli.app, spade_edge.cli.serve  # `spade --help` stays lean too\n"
        f"bad = [m for m in {SERVICE_MODULES!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"runtime imported {out.stdout.strip()}"


def test_serve_package_loads_the_stack() -> None:
    # the same check can fail: importing the service does pull FastAPI in
    code = "import sys, spade_edge.serve; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"

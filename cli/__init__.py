"""Command-line entry points (typer). Only this package turns typed errors into exit codes."""

import os

# OpenBLAS threads otherwise spin after each GEMM and steal the cores the next image's inference
# needs. It must be set before numpy loads, i.e. here, before any command module imports it;
# library users can export it themselves.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

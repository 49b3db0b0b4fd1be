"""spade-eval with ``--matcher cuda`` on the SIMT emulator: the CUDA matcher's metrics, no GPU.

Usage: python scripts/simt_eval.py MODEL DATA_DIR [spade-eval options...]

The matcher's host code and its .cu kernels run exactly as on a GPU, but on the CPU emulator of
spade_edge_testing (about 15 s per image for Lite0 at K=5 on one core), so this is a correctness
run for machines without a GPU, not a speed measurement. Compare with the same command's
``--matcher numpy`` report.
"""

from __future__ import annotations

import sys

from spade_edge_testing import fake_pycuda


def main() -> None:
    fake_pycuda.install_emulator()
    from spade_edge.cli.eval import main as eval_main

    sys.argv = ["spade-eval", *sys.argv[1:], "--matcher", "cuda"]
    eval_main()


if __name__ == "__main__":
    main()

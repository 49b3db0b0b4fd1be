"""A small CudaMatcher workload for compute-sanitizer (memcheck / racecheck / synccheck).

Every fused-kernel variant (block rows 128/64/32/16) scores one image of a gallery with odd
sizes (positions and channels off the tile multiples, 1-3 channel chunks, split-M), and each
result is compared with the NumPy matcher; exit status 1 on a mismatch. `make device-check`
runs it under the sanitizer tools; ``--simt`` runs it on the CPU SIMT emulator instead (to check
this script where there is no GPU).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from spade_edge_testing.matching import assert_matches, make_gallery, random_features


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simt", action="store_true", help="run on the SIMT emulator")
    a = ap.parse_args()
    if a.simt:
        from spade_edge_testing import fake_pycuda

        fake_pycuda.install_emulator()
    from spade_edge.runtime.matchers import cuda as cm
    from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher

    rng = np.random.default_rng(11)
    g = make_gallery(rng, [(9, 7, 40), (13, 11, 72), (5, 3, 136)], 48, 9, size=40)
    f = random_features(rng, g.contract, 1)
    want = NumpyMatcher(g, k_image=3, k_gallery=4).score(f)
    m = cm.CudaMatcher(g, k_image=3, k_gallery=4)
    failed = 0
    try:
        for bm in cm.BM_CHOICES:
            m.set_block_rows(bm)
            try:
                assert_matches(m.score(f), want)
                print(f"block rows {bm}: matches the NumPy matcher")
            except AssertionError as e:
                failed = 1
                print(f"block rows {bm}: MISMATCH {str(e).strip().splitlines()[0]}")
    finally:
        m.close()
    return failed


if __name__ == "__main__":
    sys.exit(main())

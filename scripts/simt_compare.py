"""CUDA matcher on the SIMT emulator vs the NumPy matcher, image by image, on real features.

Usage: python scripts/simt_compare.py MODEL DATA_DIR [--k 50] [--per-class 2] [--train 209]

Packs train/good (or its first --train images), takes --per-class test images from each
defect type, and reports per image: same neighbours, image-score difference, largest map
difference relative to the map's range. A correctness check for machines without a GPU (Lite0
at K=50 costs about 2 minutes per image on one core), not a speed measurement.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from spade_edge_testing import fake_pycuda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--train", type=int, default=0, help="first N train images (0 = all)")
    a = ap.parse_args()

    fake_pycuda.install_emulator()
    from spade_edge.runtime.gallery import Gallery
    from spade_edge.runtime.matchers.cuda import CudaMatcher
    from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.preprocess import prepare_path
    from spade_edge.runtime.runners.ort import OrtRunner

    train = sorted((a.data_dir / "train" / "good").glob("*.png"))
    train = train[: a.train] if a.train else train
    tests = []
    for sub in sorted(p for p in (a.data_dir / "test").iterdir() if p.is_dir()):
        tests += sorted(sub.glob("*.png"))[: a.per_class]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "g.bin"
        pack(a.model, train, out, progress=False, far=0)
        g = Gallery.open(out)
        runner = OrtRunner(a.model)
        cpu = NumpyMatcher(g, k_image=a.k, k_gallery=a.k)
        gpu = CudaMatcher(g, k_image=a.k, k_gallery=a.k)
        print(f"gallery {g.n_images} images, K={a.k}, plan {gpu.plan()}")
        worst = 0.0
        for p in tests:
            f = runner.infer(prepare_path(p, runner.contract).tensor[None])
            t = time.perf_counter()
            got = gpu.score(f)[0]
            dt = time.perf_counter() - t
            want = cpu.score(f)[0]
            same = bool(np.array_equal(got.neighbors, want.neighbors))
            rng = float(want.anomaly_map.max() - want.anomaly_map.min())
            err = float(np.abs(got.anomaly_map - want.anomaly_map).max()) / rng
            worst = max(worst, err)
            print(
                f"{p.parent.name}/{p.name}: neighbours equal {same}, score "
                f"{got.image_score:.6f} vs {want.image_score:.6f}, map max|diff|/range "
                f"{err:.2e} ({dt:.0f} s emulated)"
            )
        print(f"worst map max|diff|/range: {worst:.2e}")
        gpu.close()


if __name__ == "__main__":
    main()

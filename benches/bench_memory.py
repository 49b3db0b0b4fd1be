"""Memory of the embedding API over many calls: RSS of a process that calls
``Detector.predict`` N times (default 10,000) on real images, sampled every 1,000 calls.

    .venv/bin/python benches/bench_memory.py --model artifacts/lite0.onnx --calls 10000

Packs a gallery from bottle train/good (first 50 images) unless --gallery is given.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "lite0.onnx")
    ap.add_argument("--gallery", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=1_000)
    args = ap.parse_args()

    from spade_edge.runtime.detector import Detector
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.preprocess import load_image

    images = sorted((DATA / "test").rglob("*.png"))[:20]
    frames = [load_image(p) for p in images]  # decoded once: we measure the detector
    with tempfile.TemporaryDirectory() as tmp:
        gallery = args.gallery
        if gallery is None:
            gallery = Path(tmp) / "g.bin"
            train = sorted((DATA / "train" / "good").glob("*.png"))[:50]
            pack(args.model, train, gallery, progress=False, far=0)
        with Detector.load(args.model, gallery) as det:
            t0 = time.perf_counter()
            print(f"{'calls':>8} {'rss MB':>8} {'ms/call':>8}")
            print(f"{0:>8} {rss_mb():8.1f} {'':>8}")
            last = t0
            for i in range(1, args.calls + 1):
                det.predict(frames[i % len(frames)])
                if i % args.every == 0:
                    now = time.perf_counter()
                    print(
                        f"{i:>8} {rss_mb():8.1f} {1000 * (now - last) / args.every:8.1f}",
                        flush=True,
                    )
                    last = now


if __name__ == "__main__":
    main()

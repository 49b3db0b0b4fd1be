"""Gallery figures for the report: bytes per image, pack overhead, open time of a big gallery.

    .venv/bin/python benches/bench_gallery.py [--model artifacts/lite0.onnx]
        [--images ../shared/data/mvtec_ad/bottle/train/good] [--open-gb 0.5] [--json out.json]

1. bytes per image of a wrn50 gallery at 224, computed from the v1 layout;
2. packing throughput vs the bare backbone in the same run: ``runner.infer`` alone on the
   already-preprocessed images (batch 8) against the whole ``pack()`` (hashing, decoding,
   inference, norms, checksums, atomic write). Overhead = pack time / backbone time - 1;
3. open time of a synthetic gallery of ``--open-gb`` GB (mmap; no payload read), and the time
   of a full ``--verify`` for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from spade_edge.runtime.contract import Contract, Level
from spade_edge.runtime.gallery import Gallery, bytes_per_image, write_gallery
from spade_edge.runtime.synthetic import random_gallery

ROOT = Path(__file__).resolve().parents[1]


def wrn50_contract(image_size: int = 224) -> Contract:
    s = image_size
    return Contract(
        backbone="wrn50",
        weights="imagenet",
        levels=(
            Level("layer1", 4, 256, s // 4, s // 4),
            Level("layer2", 8, 512, s // 8, s // 8),
            Level("layer3", 16, 1024, s // 16, s // 16),
        ),
        pooled_dim=2048,
        image_size=s,
    )


def bench_pack(
    model: Path, images: Path, batch: int, repeats: int, workers: int | None = None
) -> dict[str, float]:
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.preprocess import list_images, prepare_path
    from spade_edge.runtime.runners import open_runner

    paths = list_images([images])
    runner = open_runner(model, "ort")
    x = np.stack([prepare_path(p, runner.contract).tensor for p in paths])
    runner.infer(x[:batch])  # warm-up (session init, allocations)

    def bare() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            runner.infer(x[i : i + batch])
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "g.bin"

        reports = []

        def packed() -> float:
            t0 = time.perf_counter()
            rep = pack(
                model,
                [images],
                out,
                batch_size=batch,
                backend="ort",
                progress=False,
                workers=workers,
                far=0,  # packing speed only (thresholds: spade-threshold)
            )
            dt = time.perf_counter() - t0
            reports.append((dt, rep))
            return dt

        # interleave so background load on the shared machine hits both alike
        bares, packs = [], []
        for _ in range(repeats):
            bares.append(bare())
            packs.append(packed())
    runner.close()
    b, p = min(bares), min(packs)
    best = min(reports, key=lambda t: t[0])[1]
    return {
        "images": len(paths),
        "batch": batch,
        "backbone_s": b,
        "pack_s": p,
        "backbone_img_s": len(paths) / b,
        "pack_img_s": len(paths) / p,
        "overhead": p / b - 1.0,
        "pack_infer_s": best.infer_seconds,
        "pack_decode_wait_s": best.decode_wait_seconds,
        "pack_write_s": best.write_seconds,
        "backbone_s_all": bares,
        "pack_s_all": packs,
    }


def bench_open(gb: float, repeats: int = 20) -> dict[str, float]:
    c = wrn50_contract()
    n = max(1, round(gb * 1e9 / bytes_per_image(c)))
    # one random image repeated n times: the content is irrelevant here, its generation cost too
    g = random_gallery(c, n, distinct=1)
    pooled = g.pooled[0:n]
    levels = [a[0:n] for a in g.levels]
    sources = [
        {"name": f"{i}.png", "sha256": hashlib.sha256(str(i).encode()).hexdigest()}
        for i in range(n)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "big.bin"
        t0 = time.perf_counter()
        write_gallery(p, c, "0" * 64, pooled, levels, sources)
        t_write = time.perf_counter() - t0
        del pooled, levels
        opens = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            g = Gallery.open(p)
            opens.append(time.perf_counter() - t0)
            g.close()
        t0 = time.perf_counter()
        Gallery.open(p, verify=True).close()
        t_verify = time.perf_counter() - t0
        size = p.stat().st_size
    return {
        "images": n,
        "file_bytes": size,
        "write_s": t_write,
        "open_ms_median": 1e3 * statistics.median(opens),
        "open_ms_max": 1e3 * max(opens),
        "open_verify_s": t_verify,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "lite0.onnx")
    ap.add_argument(
        "--images", type=Path, default=ROOT.parent / "shared/data/mvtec_ad/bottle/train/good"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: auto)")
    ap.add_argument(
        "--ort-threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads for both sides (0 = ORT default: all cores)",
    )
    ap.add_argument("--open-gb", type=float, default=0.5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if args.ort_threads:
        os.environ["SPADE_ORT_THREADS"] = str(args.ort_threads)  # read by OrtRunner
    res: dict[str, object] = {"ort_threads": args.ort_threads, "cpus": os.cpu_count()}
    bpi = bytes_per_image(wrn50_contract())
    res["wrn50_224_bytes_per_image"] = bpi
    print(f"wrn50 @224: {bpi:,} bytes/image ({bpi / 1e6:.2f} MB, {bpi / 2**20:.2f} MiB)")

    if args.model.is_file() and args.images.is_dir():
        r = bench_pack(args.model, args.images, args.batch, args.repeats, args.workers)
        res["pack"] = r
        print(
            f"pack {args.model.name}: {r['images']} images, batch {r['batch']}: backbone "
            f"{r['backbone_s']:.2f} s ({r['backbone_img_s']:.1f} img/s), pack {r['pack_s']:.2f} s "
            f"({r['pack_img_s']:.1f} img/s) -> overhead {100 * r['overhead']:+.1f}%\n"
            f"  inside pack: infer {r['pack_infer_s']:.2f} s, waiting for decode "
            f"{r['pack_decode_wait_s']:.2f} s, norms+write {r['pack_write_s']:.2f} s"
        )
    else:
        print(f"pack: skipped ({args.model} or {args.images} missing)")

    if args.open_gb > 0:
        o = bench_open(args.open_gb)
        res["open"] = o
        print(
            f"open {o['file_bytes'] / 1e9:.2f} GB gallery ({o['images']} wrn50 images): "
            f"median {o['open_ms_median']:.2f} ms (max {o['open_ms_max']:.2f} ms); "
            f"--verify {o['open_verify_s']:.2f} s; write {o['write_s']:.2f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()

"""Accuracy and speed of fp32 / fp16 / INT8 models: the table in docs/precision.md.

Accuracy: MVTec AD bottle, SPADE K=5 (image AUROC, pixel AUROC, AUPRO@0.3) with Lite0 (ImageNet
weights), each precision packing its own gallery (``spade_edge.runtime.evaluate``), plus the
lineage accuracy check of each derived model. Speed: ONNX Runtime CPU backbone latency (batch
1, one real image) of Lite0 and wrn50 (random weights are fine for speed), all precisions of one
backbone timed round-robin in the same run so machine load hits them alike; medians of
``--repeats`` rounds and the ratio to fp32 of the same run.

Run from the repository root::

    .venv/bin/python benches/bench_precision.py --json artifacts/precision.json

Models are exported / derived into ``--work`` (default artifacts/precision) once and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fp32_model(backbone: str, given: Path | None, work: Path, weights: str) -> Path:
    """The fp32 parent: ``given`` if it exists, else exported once into ``work``."""
    if given is not None and given.is_file():
        return given
    out = work / f"{backbone}.{weights}.fp32.onnx"
    if not out.is_file():
        from spade_edge.export.onnx_export import export_onnx

        log(f"exporting {backbone} ({weights}) -> {out}")
        export_onnx(backbone, out, weights=weights, progress=False)
    return out


def derive(parent: Path, work: Path, calib: Path, calib_images: int | None) -> dict[str, Path]:
    """fp16, INT8 (TensorRT Q/DQ) and INT8 (CPU Q/DQ) children of ``parent`` (cached)."""
    from spade_edge.calibration.fp16 import convert_fp16
    from spade_edge.calibration.int8 import quantize_int8
    from spade_edge.runtime.model_meta import read_model_info

    parent_fp = read_model_info(parent).fingerprint

    def fresh(child: Path) -> bool:  # cached child of THIS parent (it may have been re-exported)
        return child.is_file() and read_model_info(child).contract.parent_fingerprint == parent_fp

    stem = parent.name.removesuffix(".onnx").removesuffix(".fp32")
    out = {"fp32": parent}
    p16 = work / f"{stem}.fp16.onnx"
    if not fresh(p16):
        log(f"fp16: {p16}")
        convert_fp16(parent, p16, check_dir=calib)
    out["fp16"] = p16
    for target in ("trt", "cpu"):
        p8 = work / f"{stem}.int8-{target}.onnx"
        if not fresh(p8):
            log(f"int8 ({target}): {p8}")
            quantize_int8(parent, p8, calib, num_images=calib_images, target=target)
        out[f"int8-{target}"] = p8
    return out


def lineage_summary(model: Path) -> dict[str, Any] | None:
    from spade_edge.calibration.lineage import read_lineage
    from spade_edge.runtime.model_meta import read_model_info

    lin = read_lineage(read_model_info(model).metadata)
    if lin is None:
        return None
    c = lin.check
    return {
        "passed": lin.passed,
        "gallery_compatible": lin.gallery_compatible,
        "image_score_rel": c.get("image_score_rel"),
        "map_rel": c.get("map_rel"),
        "min_cosine": c.get("min_cosine"),
        "failed": c.get("failed"),
    }


def accuracy(models: dict[str, Path], data: Path, k: int) -> dict[str, dict[str, Any]]:
    from spade_edge.runtime.evaluate import evaluate

    res = {}
    for name, path in models.items():
        log(f"evaluating {name} on {data.name} (K={k})")
        t0 = time.perf_counter()
        r = evaluate(path, data, k_image=k, k_gallery=k, far=None)
        res[name] = {
            "image_auroc": float(r["image_auroc"]),
            "pixel_auroc": float(r["pixel_auroc"]),
            "aupro": float(r["aupro"]),
            "seconds": round(time.perf_counter() - t0, 1),
            "lineage": lineage_summary(path) if name != "fp32" else None,
        }
    return res


def latency(
    models: dict[str, Path], image: Path, repeats: int, threads: int | None
) -> dict[str, dict[str, float]]:
    """Median batch-1 latency per model, timed round-robin (same load for every precision)."""
    from spade_edge.runtime.preprocess import prepare_path
    from spade_edge.runtime.runners.ort import OrtRunner

    runners = {n: OrtRunner(p, threads=threads) for n, p in models.items()}
    try:
        x = prepare_path(image, next(iter(runners.values())).contract).tensor[None]
        for r in runners.values():  # warm-up: allocations, kernel selection
            for _ in range(3):
                r.infer(x)
        times: dict[str, list[float]] = {n: [] for n in runners}
        for _ in range(repeats):
            for n, r in runners.items():
                t0 = time.perf_counter()
                r.infer(x)
                times[n].append((time.perf_counter() - t0) * 1e3)
    finally:
        for r in runners.values():
            r.close()
    base = statistics.median(times["fp32"])
    base10 = float(np.percentile(times["fp32"], 10))
    return {
        n: {
            "median_ms": statistics.median(t),
            "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)),
            "speedup_vs_fp32": base / statistics.median(t),
            # the fast tail is what the model costs when the shared machine leaves it alone
            "speedup_p10_vs_fp32": base10 / float(np.percentile(t, 10)),
        }
        for n, t in times.items()
    }


def markdown(result: dict[str, Any]) -> str:
    lines = []
    acc = result.get("accuracy", {})
    if acc:
        lines += [
            f"Accuracy, MVTec AD bottle, Lite0, K={result['k']} (own gallery per model):",
            "",
            "| model | image AUROC | pixel AUROC | AUPRO | Δ vs fp32 (max) | lineage check |",
            "|---|---|---|---|---|---|",
        ]
        ref = acc.get("fp32")
        for name, r in acc.items():
            delta = (
                max(abs(r[m] - ref[m]) for m in ("image_auroc", "pixel_auroc", "aupro"))
                if ref
                else float("nan")
            )
            lin = r.get("lineage")
            chk = (
                "—"
                if lin is None
                else (
                    f"{'passed' if lin['passed'] else 'failed'} "
                    f"(score {lin['image_score_rel']:.4f}, map {lin['map_rel']:.4f}, "
                    f"cos {lin['min_cosine']:.4f})"
                    if lin.get("image_score_rel") is not None
                    else "not run"
                )
            )
            lines.append(
                f"| {name} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} "
                f"| {delta:.4f} | {chk} |"
            )
        lines.append("")
    for backbone, lat in result.get("latency", {}).items():
        lines += [
            f"ORT CPU latency, {backbone}, batch 1, {result['repeats']} round-robin rounds "
            f"({result['threads'] or 'default'} threads):",
            "",
            "| model | median ms | p10–p90 ms | speed-up vs fp32 (median) | (p10) |",
            "|---|---|---|---|---|",
        ]
        for name, r in lat.items():
            lines.append(
                f"| {name} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}–{r['p90_ms']:.1f} "
                f"| {r['speedup_vs_fp32']:.2f}× | {r['speedup_p10_vs_fp32']:.2f}× |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--lite0", type=Path, default=ROOT / "artifacts" / "lite0.onnx")
    ap.add_argument("--wrn50", type=Path, default=None, help="fp32 wrn50 ONNX (else exported)")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "precision")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    ap.add_argument("--calib-images", type=int, default=None, help="default: library default")
    ap.add_argument("--wrn50-calib-images", type=int, default=16)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    if not (args.data / "train" / "good").is_dir():
        print(f"error: {args.data}: MVTec bottle not found", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.data / "train" / "good"
    result: dict[str, Any] = {"k": args.k, "repeats": args.repeats, "threads": args.threads}

    lite0 = derive(
        fp32_model("efficientnet_lite0", args.lite0, args.work, "imagenet"),
        args.work,
        calib,
        args.calib_images,
    )
    if not args.skip_accuracy:
        result["accuracy"] = accuracy(lite0, args.data, args.k)
    if not args.skip_speed:
        image = sorted((args.data / "test" / "good").glob("*.png"))[0]
        wrn50 = derive(
            fp32_model("wrn50", args.wrn50, args.work, "random"),
            args.work,
            calib,
            args.wrn50_calib_images,
        )
        result["latency"] = {}
        for name, models in (("Lite0", lite0), ("wrn50", wrn50)):
            log(f"timing {name}")
            result["latency"][name] = latency(models, image, args.repeats, args.threads)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

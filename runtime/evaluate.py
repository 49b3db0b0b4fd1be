"""`spade-eval`: SPADE metrics on an MVTec-AD-layout category (train/good, test/*, ground_truth/*).

The gallery is packed from train/good (or given), every test image is scored, and image AUROC,
pixel AUROC and AUPRO@0.3 are computed over the crop (masks resized with nearest neighbour and
centre-cropped exactly like the images). With thresholds (from normal images only) it also reports
false-positive / false-negative rates on the test set.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spade_edge.runtime.autoselect import select
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.detector import Detector
from spade_edge.runtime.errors import InputError
from spade_edge.runtime.metrics import aupro, image_auroc, pixel_auroc
from spade_edge.runtime.packer import pack
from spade_edge.runtime.preprocess import IMAGE_SUFFIXES, crop_geometry, load_image
from spade_edge.runtime.thresholds import calibrate_gallery


@dataclass(frozen=True)
class TestItem:
    path: Path
    defect: str  # "good" or the defect type
    mask: Path | None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def scan_mvtec(data_dir: str | Path) -> tuple[list[Path], list[TestItem]]:
    """Train images and labelled test items of one category; errors name what is missing."""
    root = Path(data_dir)
    train_dir, test_dir, gt_dir = root / "train" / "good", root / "test", root / "ground_truth"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise InputError(
                f"{root}: not an MVTec-layout category (missing {d.relative_to(root)})"
            )
    train = _images(train_dir)
    if not train:
        raise InputError(f"{train_dir}: no training images")
    items: list[TestItem] = []
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for img in _images(sub):
            mask = None
            if sub.name != "good":
                mask = gt_dir / sub.name / f"{img.stem}_mask.png"
                if not mask.is_file():
                    raise InputError(f"{mask}: ground-truth mask missing for {img}")
            items.append(TestItem(img, sub.name, mask))
    if not items:
        raise InputError(f"{test_dir}: no test images")
    return train, items


def prepare_mask(path: Path | None, image_path: Path, contract: Contract) -> np.ndarray:
    """Ground truth in crop geometry: nearest-neighbour resize, centre crop; None -> all normal."""
    s = contract.image_size
    if path is None:
        return np.zeros((s, s), dtype=bool)
    im = load_image(path).convert("L")
    ref = load_image(image_path)
    if im.size != ref.size:
        raise InputError(f"{path}: mask size {im.size} differs from image size {ref.size}")
    g = crop_geometry(im.width, im.height, contract)
    if (g.resized_width, g.resized_height) != im.size:
        im = im.resize((g.resized_width, g.resized_height), Image.Resampling.NEAREST)
    return np.asarray(im)[g.top : g.top + s, g.left : g.left + s] > 127


def evaluate(
    model: str | Path,
    data_dir: str | Path,
    k_image: int = 5,
    k_gallery: int = 5,
    matcher: str = "numpy",
    backend: str = "auto",
    gallery: str | Path | None = None,
    batch_size: int = 8,
    far: float | None = 0.01,
    progress: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Run the whole protocol; returns a JSON-friendly report (image_auroc, pixel_auroc, aupro…).

    ``progress(stage, total)`` returns a callable advanced once per image (or None).
    """
    train, items = scan_mvtec(data_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spade-eval-") as tmp:
        gpath = Path(gallery) if gallery else Path(tmp) / "gallery.bin"
        if gallery is None:
            pack(
                model,
                train,
                gpath,
                batch_size=batch_size,
                backend=backend,
                progress=False,
                far=0,  # thresholds below, at the evaluated K
            )
        t_pack = time.perf_counter() - t0
        th_report: dict[str, Any] | None = None
        if far is not None:
            calib_path = Path(tmp) / "calibrated.bin"
            th_report = calibrate_gallery(
                gpath, calib_path, far=far, k_image=k_image, k_gallery=k_gallery
            )
            gpath = calib_path
        t1 = time.perf_counter()
        det = Detector.load(
            model, gpath, backend=backend, matcher=matcher, k_image=k_image, k_gallery=k_gallery
        )
        try:
            contract = det.contract
            tick = progress("scoring", len(items)) if progress else None
            scores, maps, masks, records = [], [], [], []
            for item, (_, res) in zip(
                items, det.predict_paths([it.path for it in items], batch_size), strict=True
            ):
                if isinstance(res, Exception):
                    raise res
                scores.append(res.score)
                maps.append(res.anomaly_map)
                masks.append(prepare_mask(item.mask, item.path, contract))
                records.append(
                    {"image": str(item.path), "defect": item.defect, "score": float(res.score)}
                )
                if tick:
                    tick(1)
            thr, pthr = det.threshold, det.pixel_threshold
            used = {"backend": det.runner.name, "matcher": det.matcher.name}
            stats = getattr(det.matcher, "candidate_stats", None)
            if stats is not None:  # exact low-precision matcher: what the re-rank needed
                used["rerank_candidates_per_query"] = stats()
            precision = getattr(det.runner, "effective_precision", None)
            if precision is not None:
                used["runner_effective_precision"] = precision
        finally:
            det.close()
        t_score = time.perf_counter() - t1
    labels = np.array([it.defect != "good" for it in items], dtype=np.uint8)
    maps_a = np.stack(maps)
    masks_a = np.stack(masks)
    report: dict[str, Any] = {
        "model": str(model),
        "data_dir": str(data_dir),
        "k_image": k_image,
        "k_gallery": k_gallery,
        "backend_requested": backend,
        "matcher_requested": matcher,
        **used,
        "n_train": len(train),
        "n_test": len(items),
        "n_anomalous": int(labels.sum()),
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks_a, maps_a),
        "aupro": aupro(masks_a, maps_a, 0.3),
        "seconds": {
            "pack": round(t_pack, 3),
            "score": round(t_score, 3),
            "per_test_image_ms": round(1000 * t_score / len(items), 2),
        },
        "images": records,
    }
    if "auto" in (backend, matcher):
        report["auto_selection"] = select(model).to_dict()
    if thr is not None and th_report is not None:
        s = np.asarray(scores)
        good, bad = labels == 0, labels == 1
        report["thresholds"] = {k: v for k, v in th_report.items() if k != "tool_version"}
        report["test_false_positive_rate"] = float((s[good] >= thr).mean())
        report["test_false_negative_rate"] = float((s[bad] < thr).mean())
        if pthr is not None:
            pix = maps_a >= pthr
            report["test_pixel_false_positive_rate"] = float(pix[~masks_a].mean())
            report["test_pixel_true_positive_rate"] = float(pix[masks_a].mean())
    return report

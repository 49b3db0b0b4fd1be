"""Evaluation metrics as defined in ../shared/data/README.md (MVTec AD protocol).

ROC AUCs come from scikit-learn; AUPRO is computed from its definition: at each distinct score
threshold t, PRO(t) is the mean over all connected ground-truth regions (scipy.ndimage.label,
4-connectivity) of the fraction of the region's pixels scoring >= t, and FPR(t) the fraction of
normal pixels scoring >= t. The curve is interpolated linearly at FPR = limit, its trapezoid area
over [0, limit] divided by limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from spade_edge.runtime.errors import BackendUnavailableError, InputError


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        raise BackendUnavailableError(
            "evaluation needs scikit-learn: pip install 'spade-edge[eval]'"
        ) from None
    if labels.min() == labels.max():
        raise InputError("AUROC needs both normal and anomalous samples")
    return float(roc_auc_score(labels, scores))


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """AUROC of image scores (label 1 = anomalous)."""
    return _roc_auc(np.asarray(labels), np.asarray(scores, dtype=np.float64))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over every pixel of every image (masks bool [N,H,W], maps float [N,H,W])."""
    return _roc_auc(masks.reshape(-1).astype(np.uint8), maps.reshape(-1))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``."""
    masks = masks.astype(bool)
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        w = np.zeros_like(lab, dtype=np.float64)
        w[lab > 0] = 1.0 / sizes[lab[lab > 0]]
        weights[i] = w
        n_regions += n
    if n_regions == 0:
        raise InputError("AUPRO needs at least one anomalous region")
    normal = ~masks
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise InputError("AUPRO needs normal pixels")
    s = maps.reshape(-1).astype(np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    pro = np.cumsum(weights.reshape(-1)[order]) / n_regions
    fpr = np.cumsum(normal.reshape(-1)[order]) / n_normal
    # one point per distinct score: the last position of each run of equal scores
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    x = fpr[:cut]
    y = pro[:cut]
    if cut < len(fpr) and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.r_[x, fpr_limit]
        y = np.r_[y, y_lim]
    # the trapezoid rule written out (numpy's own formula): np.trapezoid is numpy>=2 only and
    # np.trapz is gone from numpy 2.4, while JetPack and Triton's stub run numpy 1.26
    area = (np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum()
    return float(area / fpr_limit)

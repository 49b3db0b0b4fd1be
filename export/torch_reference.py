"""A plain torch implementation of the SPADE protocol: the yardstick of ``spade-bench
--compare-torch`` (what a team would write without spade-edge: batch-8 features, ``torch.cdist``,
``topk``, bilinear upsampling, scipy's Gaussian). Lives in ``export`` because it needs torch
(extra ``[export]``); the runtime never imports it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.export.onnx_export import build_feature_model
from spade_edge.runtime.errors import SpadeError
from spade_edge.runtime.matchers import open_matcher
from spade_edge.runtime.preprocess import load_image, preprocess
from spade_edge.runtime.runners import open_runner
from spade_edge.runtime.scoring import DEFAULT_SIGMA, GAUSSIAN_TRUNCATE
from spade_edge.runtime.synthetic import random_gallery

#: cdist output elements per call: bounds memory at any K (wrn50 K=50 would be 2 GB at once)
CDIST_ELEMENTS = 16 * 1024 * 1024


class TorchReference:
    """SPADE scoring in torch over a given gallery (float32 NHWC levels, pooled features)."""

    def __init__(
        self,
        backbone: str,
        weights: str,
        gallery_levels: Sequence[np.ndarray],
        gallery_pooled: np.ndarray,
        k: int,
        image_size: int,
        sigma: float = DEFAULT_SIGMA,
        threads: int | None = None,
        seed: int = 0,
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model, _ = build_feature_model(backbone, weights, seed=seed, progress=False)
        self.levels = [torch.from_numpy(np.asarray(g, dtype=np.float32)) for g in gallery_levels]
        self.pooled = torch.from_numpy(np.asarray(gallery_pooled, dtype=np.float32))
        self.k = k
        self.size = image_size
        self.sigma = sigma

    def _min_dist(self, q: Any, g: Any) -> Any:
        torch = self.torch
        step = max(1, CDIST_ELEMENTS // len(q))
        best = None
        for s in range(0, len(g), step):
            d = torch.cdist(q, g[s : s + step]).min(dim=1).values
            best = d if best is None else torch.minimum(best, d)
        return best

    def score(self, batch: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """Image scores and anomaly maps for a preprocessed ``[B, 3, S, S]`` batch."""
        from scipy.ndimage import gaussian_filter

        torch = self.torch
        F = torch.nn.functional
        out = []
        with torch.inference_mode():
            feats = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
            levels, pooled = feats[:-1], feats[-1].reshape(len(batch), -1)
            dist, idx = torch.cdist(pooled, self.pooled).topk(self.k, largest=False)
            for b in range(len(batch)):
                maps = []
                for lv, g in zip(levels, self.levels, strict=True):
                    h, w, c = lv.shape[1:]
                    d = self._min_dist(lv[b].reshape(-1, c), g[idx[b]].reshape(-1, c))
                    up = F.interpolate(
                        d.reshape(1, 1, h, w),
                        size=(self.size, self.size),
                        mode="bilinear",
                        align_corners=False,
                    )
                    maps.append(up[0, 0])
                amap = torch.stack(maps).mean(dim=0).numpy()
                amap = gaussian_filter(amap, sigma=self.sigma, truncate=GAUSSIAN_TRUNCATE)
                out.append((float(dist[b].mean()), amap.astype(np.float32)))
        return out


#: --compare-torch configurations: (label, runner backend, matcher); "auto" = this CPU's pick
COMPARE_CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("default (auto)", "ort", "auto"),
    ("fp32 + exact-int8", "ort", "exact-int8"),
    ("fp32 + exact-bf16", "ort", "exact-bf16"),
    ("bf16 backbone + exact-bf16", "openvino-bf16", "exact-bf16"),
)


def compare_torch(
    model: Path,
    images: list[Path],
    ks: tuple[int, ...] = (5, 50),
    n_gallery: int = 64,
    repeats: int = 3,
    weights: str | None = None,
    configs: tuple[tuple[str, str, str], ...] = COMPARE_CONFIGS,
) -> list[dict[str, Any]]:
    """Per test image ms of spade-edge configurations and of a plain torch reference of the same
    protocol (``spade_edge.export.torch_reference``: batch-8 features, torch.cdist), same images,
    same gallery, interleaved within each repeat so machine load hits all alike; ratios =
    torch ms / spade-edge ms (medians over repeats). A configuration that cannot run here
    (missing package) is reported with its error, not dropped silently."""
    base = open_runner(model, "ort")
    c = base.contract
    base.close()
    gallery = random_gallery(c, max(n_gallery, max(ks)))
    g_levels = [np.asarray(lv, dtype=np.float32) for lv in gallery.levels]
    g_pooled = np.asarray(gallery.pooled, dtype=np.float32)
    # the contract records "random:seed=N" or "imagenet:...": rebuild the same weights
    kind, _, detail = c.weights.partition(":")
    tag = weights or ("random" if kind == "random" else "imagenet")
    seed = int(detail.split("=", 1)[1]) if detail.startswith("seed=") else 0
    batch = np.stack([preprocess(load_image(p), c).tensor for p in images])
    rows = []
    for k in ks:
        ref = TorchReference(c.backbone, tag, g_levels, g_pooled, k, c.image_size, seed=seed)
        runs: dict[str, Callable[[], Any]] = {}
        errors: dict[str, str] = {}
        opened: list[Any] = []
        for label, backend, matcher in configs:
            try:
                r = open_runner(model, backend)
                m = open_matcher(gallery, matcher, k_image=k, k_gallery=k)
            except SpadeError as e:
                errors[label] = str(e)
                continue
            opened += [r, m]

            def run(r: Any = r, m: Any = m) -> None:
                for p in images:  # the product path: decode, preprocess, batch of one
                    m.score(r.infer(preprocess(load_image(p), c).tensor[None]))

            runs[label] = run
            runs[label]()  # warm-up (lazy gallery conversion, first-run allocations)

        def torch_run(ref: TorchReference = ref) -> None:
            for s in range(0, len(images), 8):
                x = np.stack([preprocess(load_image(p), c).tensor for p in images[s : s + 8]])
                ref.score(x)

        runs["torch reference"] = torch_run
        ref.score(batch[:1])
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - t) / len(images))
        torch_ms = statistics.median(times["torch reference"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append(
                {
                    "backbone": c.backbone,
                    "k": k,
                    "configuration": name,
                    "ms_per_image": ms,
                    "speedup_vs_torch": torch_ms / ms,
                    "all_ms": ts,
                }
            )
        for name, err in errors.items():
            rows.append({"backbone": c.backbone, "k": k, "configuration": name, "error": err})
        for o in opened:
            o.close()
    return rows


__all__ = ["COMPARE_CONFIGS", "TorchReference", "compare_torch"]

"""Oracle: an independent, slow, obviously-correct SPADE written from the protocol text.

It shares no scoring code with the product: distances by explicit differences in float64
(torch.cdist), bilinear upsampling by torch's F.interpolate, Gaussian blur by an explicit
separable kernel with half-sample-symmetric padding. Features come from the exported model run in
ONNX Runtime (the backbone is not what is under test here), gallery features rounded to fp16 as the
gallery format stores them. The product must agree to rel error < 1e-4 in fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")


def oracle_blur(m: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    out = m.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for j, wj in enumerate(w):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(j, j + n)
            acc += wj * p[tuple(sl)]
        out = acc
    return out


def oracle_spade(test_feats, gallery_feats, k: int, size: int):
    """SPADE from the text. test: ([H,W,C] per level, [Cg]); gallery: ([N,H,W,C]..., [N,Cg])."""
    t_levels, t_pooled = test_feats
    g_levels, g_pooled = gallery_feats
    d = torch.cdist(
        torch.from_numpy(t_pooled[None].astype(np.float64)),
        torch.from_numpy(g_pooled.astype(np.float64)),
    )[0].numpy()
    order = np.argsort(d, kind="stable")[:k]
    score = d[order].mean()
    up = []
    for q, g in zip(t_levels, g_levels, strict=True):
        h, w, c = q.shape
        qq = torch.from_numpy(q.reshape(-1, c).astype(np.float64))
        best = torch.full((h * w,), float("inf"), dtype=torch.float64)
        for i in order:  # every position of each of the K nearest images
            gg = torch.from_numpy(g[i].reshape(-1, c).astype(np.float64))
            best = torch.minimum(best, torch.cdist(qq, gg).min(dim=1).values)
        m = best.reshape(1, 1, h, w)
        up.append(
            torch.nn.functional.interpolate(
                m, size=(size, size), mode="bilinear", align_corners=False
            )[0, 0]
        )
    avg = torch.stack(up).mean(0).numpy()
    return score, oracle_blur(avg)


@pytest.mark.parametrize("k", [5, 50])
def test_product_matches_oracle(k: int, lite0_onnx: Path, bottle_dir: Path, tmp_path: Path) -> None:
    from spade_edge.runtime.detector import Detector
    from spade_edge.runtime.packer import pack
    from spade_edge.runtime.preprocess import prepare_path
    from spade_edge.runtime.runners.ort import OrtRunner

    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:60]
    tests = [
        bottle_dir / "test" / "good" / "000.png",
        bottle_dir / "test" / "broken_large" / "000.png",
        bottle_dir / "test" / "contamination" / "003.png",
    ]
    gpath = tmp_path / "g.bin"
    pack(lite0_onnx, train, gpath, progress=False, far=0)

    runner = OrtRunner(lite0_onnx)
    c = runner.contract

    def feats(paths, batch):
        # Same batching as the product (packer: 8, predict: 1): ORT's kernels differ across
        # batch sizes at the 1e-7 level, which fp16 rounding of the gallery would amplify.
        levels, pooled = [], []
        for s in range(0, len(paths), batch):
            f = runner.infer(np.stack([prepare_path(p, c).tensor for p in paths[s : s + batch]]))
            levels.append(f.levels)
            pooled.append(f.pooled)
        return [np.concatenate(x) for x in zip(*levels, strict=True)], np.concatenate(pooled)

    g_levels, g_pooled = feats(train, 8)
    g_levels = [lv.astype(np.float16).astype(np.float64) for lv in g_levels]
    g_pooled = g_pooled.astype(np.float16).astype(np.float64)
    t_levels, t_pooled = feats(tests, 1)

    with Detector.load(lite0_onnx, gpath, k_image=k, k_gallery=k) as det:
        for i, p in enumerate(tests):
            res = det.predict(p)
            score, amap = oracle_spade(
                ([lv[i] for lv in t_levels], t_pooled[i]), (g_levels, g_pooled), k, c.image_size
            )
            assert abs(res.score - score) / score < 1e-4, (p, res.score, score)
            err = np.abs(res.anomaly_map - amap).max() / np.abs(amap).max()
            assert err < 1e-4, (p, err)

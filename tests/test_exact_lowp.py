"""The exact low-precision matcher against the NumPy oracle: real bottle features, random
features, adversarial near-ties; the derived bound's ingredients; CPU feature detection and the
auto-selection's fallback on a CPU without matrix units (simulated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spade_edge.runtime import autoselect, cpu_features
from spade_edge.runtime.errors import ConfigError, InputError
from spade_edge.runtime.gallery import InMemoryGallery
from spade_edge.runtime.matchers import MATCHERS, open_matcher
from spade_edge.runtime.matchers import exact_lowp as el
from spade_edge.runtime.matchers.numpy_matcher import NumpyMatcher, min_sq_distances
from spade_edge_testing.matching import make_contract, random_features

try:
    import openvino  # noqa: F401

    HAS_OV = True
except ImportError:
    HAS_OV = False

PRECISIONS = [
    "int8",
    pytest.param("bf16", marks=pytest.mark.skipif(not HAS_OV, reason="openvino not installed")),
]


def brute_force(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """min_j ‖q_i − g_j‖² with the re-rank's own fp32 formula, over every position."""
    g = g.reshape(-1, g.shape[-1]).astype(np.float32)
    out = np.empty(len(q), dtype=np.float32)
    for i, row in enumerate(q):
        diff = row[None, :] - g
        out[i] = np.einsum("ij,ij->i", diff, diff, dtype=np.float32).min()
    return out


def gallery_from(levels: list[np.ndarray], pooled: np.ndarray, contract) -> InMemoryGallery:
    return InMemoryGallery.from_features(contract, levels, pooled)


# ----------------------------------------------------------------------------- building blocks
def test_shipped_int8_graph_is_the_built_one() -> None:
    pytest.importorskip("onnx")
    from lowp_graph import SHIPPED, int8_graph_bytes

    assert SHIPPED.read_bytes() == int8_graph_bytes(), "regenerate: python tests/lowp_graph.py"


def test_bf16_round_is_nearest_even() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10000) * 10 ** rng.uniform(-3, 3, 10000)).astype(np.float32)
    r = el.bf16_round(x)
    assert not (r.view(np.uint32) & 0xFFFF).any()  # representable in bf16
    assert np.all(np.abs(r - x) <= el.BF16_UNIT * np.abs(x))
    # neighbours one bf16 ulp apart never beat the chosen value
    up = (r.view(np.uint32) + 0x10000).view(np.float32)
    dn = (r.view(np.uint32) - 0x10000).view(np.float32)
    assert np.all(np.abs(r - x) <= np.abs(up - x)) and np.all(np.abs(r - x) <= np.abs(dn - x))
    # an exact tie goes to the even significand
    tie = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], dtype=np.float32)
    assert el.bf16_round(tie).tolist() == [1.0, 1.0 + 4 * 2.0**-8]


def test_int8_codes_stay_in_the_non_saturating_range() -> None:
    rng = np.random.default_rng(1)
    g = (rng.standard_normal((50, 24)) * 3).astype(np.float32)
    g[0] = 0.0  # all-zero position: scale 1, no division by zero
    b = el._Int8Engine.block(g)
    assert b.values.min() >= el.G_LO and b.values.max() <= el.G_HI
    approx = b.scale[:, None] * (b.values.T.astype(np.float64) - b.zero[:, None])
    resid = np.sqrt(((g - approx) ** 2).sum(axis=1))
    assert np.isclose(resid.max(), b.resid_max)
    assert np.all(np.abs(g - approx) <= b.scale[:, None] / 2 * (1 + 1e-6))


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("precision", PRECISIONS)
def test_equals_oracle_on_random_features(precision: str) -> None:
    rng = np.random.default_rng(2)
    c = make_contract([(16, 16, 64), (8, 8, 128), (4, 4, 256)], 64, 64)
    f = random_features(rng, c, 9)
    g = gallery_from(f.levels, f.pooled, c)
    q = random_features(rng, c, 2)
    ref = NumpyMatcher(g, k_image=3, k_gallery=4)
    with el.ExactLowpMatcher(g, k_image=3, k_gallery=4, precision=precision, min_channels=0) as m:
        for got, want in zip(m.score(q), ref.score(q), strict=True):
            assert got.image_score == want.image_score
            np.testing.assert_array_equal(got.neighbors, want.neighbors)
            np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-5, atol=1e-6)
        imgs = np.array([4, 0, 7])
        for li in range(len(c.levels)):
            qq = q.levels[li][0].reshape(-1, c.levels[li].channels)
            d = m.min_sq_distances(li, qq, imgs)
            np.testing.assert_array_equal(d, brute_force(qq, g.levels[li][np.sort(imgs)]))
            oracle = min_sq_distances(qq, g.levels[li], g.level_sqnorms[li], np.sort(imgs))
            assert np.all(d <= oracle)  # never worse than the oracle's winner ...
            np.testing.assert_allclose(d, oracle, rtol=1e-5)  # ... and equal within fp32
        st = m.candidate_stats()
        assert all(s["queries"] > 0 and 1 <= s["mean"] <= s["max"] for s in st.values())


def test_narrow_levels_run_the_fp32_oracle() -> None:
    """Memory-bound levels (C < 128 by default) skip the low-precision GEMM: same answer."""
    rng = np.random.default_rng(6)
    c = make_contract([(8, 8, 24), (4, 4, 256)], 16, 32)
    f = random_features(rng, c, 5)
    g = gallery_from(f.levels, f.pooled, c)
    q = random_features(rng, c, 1)
    with el.ExactLowpMatcher(g, k_image=2, k_gallery=2, precision="int8") as m:
        assert m.lowp_levels == {1}
        got = m.score(q)[0]
        st = m.candidate_stats()
        assert st["l0"] == {"fp32": True} and st["l1"]["queries"] == 16
    want = NumpyMatcher(g, k_image=2, k_gallery=2).score(q)[0]
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-5, atol=1e-6)


def adversarial(rng: np.random.Generator, c: int, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries whose gallery neighbours differ by far less than int8/bf16 rounding: one centre
    per query, positions at distances spaced 1e-3 relative apart in random directions, plus exact
    duplicates and signed values (zero points must work)."""
    centres = rng.standard_normal((n_pos, c)).astype(np.float32) * 4 + 1
    gal = np.empty((2, n_pos, c), dtype=np.float32)
    for j in range(n_pos):
        base = centres[j]
        dirs = rng.standard_normal((2, c))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        radius = 0.05 * np.linalg.norm(base) * (1 + 1e-3 * np.array([1.0, 0.0]))
        gal[:, j] = base + radius[:, None] * dirs
    gal[1, -1] = gal[0, -1]  # an exact duplicate
    gal = gal.astype(np.float16).astype(np.float32)  # what a gallery stores
    return centres, gal


@pytest.mark.parametrize("precision", PRECISIONS)
def test_adversarial_near_ties(precision: str) -> None:
    rng = np.random.default_rng(3)
    n_pos, ch = 64, 96
    centres, gal = adversarial(rng, ch, n_pos)
    c = make_contract([(8, 8, ch)], 8, 32)
    g = gallery_from([gal.reshape(2, 8, 8, ch)], rng.random((2, 8), dtype=np.float32), c)
    with el.ExactLowpMatcher(g, k_image=1, k_gallery=2, precision=precision, min_channels=0) as m:
        d = m.min_sq_distances(0, centres, np.array([0, 1]))
        truth = brute_force(centres, g.levels[0])
        np.testing.assert_array_equal(d, truth)
        # the case is hard: the low-precision argmin alone picks a farther position for some
        # queries (so a matcher without the re-rank would be wrong here)
        eng = m._engines[ch]
        qr = eng.query(centres)
        y, _ = eng.run(qr, slice(None), eng.operands([m._block(0, 0), m._block(0, 1)]))
        pick = np.argmin(y, axis=1)
        flat = g.levels[0].reshape(-1, ch).astype(np.float32)
        diff = centres - flat[pick]
        approx_only = np.einsum("ij,ij->i", diff, diff, dtype=np.float32)
        assert (approx_only > truth).any()
        assert m.stats[0].max >= 2


@pytest.mark.parametrize("precision", PRECISIONS)
def test_equals_oracle_on_bottle_features(precision: str, lite0_onnx: Path, bottle_dir: Path):
    from spade_edge.runtime.preprocess import prepare_path
    from spade_edge.runtime.runners.ort import OrtRunner

    runner = OrtRunner(lite0_onnx)
    c = runner.contract
    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:6]
    test = [
        sorted((bottle_dir / "test" / d).glob("*.png"))[0]
        for d in ("good", "broken_large", "contamination")
    ]
    gf = runner.infer(np.stack([prepare_path(p, c).tensor for p in train]))
    g = gallery_from(gf.levels, gf.pooled, c)
    qf = runner.infer(np.stack([prepare_path(p, c).tensor for p in test]))
    ref = NumpyMatcher(g, k_image=3, k_gallery=3)
    with el.ExactLowpMatcher(g, k_image=3, k_gallery=3, precision=precision, min_channels=0) as m:
        for got, want in zip(m.score(qf), ref.score(qf), strict=True):
            assert got.image_score == want.image_score
            np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-5, atol=1e-6)
        for li, lv in enumerate(c.levels):
            qq = qf.levels[li][1].reshape(-1, lv.channels)
            d = m.min_sq_distances(li, qq, np.arange(3))
            np.testing.assert_array_equal(d, brute_force(qq, g.levels[li][:3]))


def test_unknown_precision_is_a_config_error() -> None:
    rng = np.random.default_rng(4)
    c = make_contract([(4, 4, 8)], 4, 16)
    f = random_features(rng, c, 3)
    with pytest.raises(ConfigError, match="no option 'precison'"):
        open_matcher(gallery_from(f.levels, f.pooled, c), "exact-int8", precison="bf16")
    m = open_matcher(gallery_from(f.levels, f.pooled, c), "exact-int8", k_image=1, k_gallery=1)
    assert m.thread_safe is True
    m.close()
    m.close()
    with pytest.raises(InputError, match="after close"):
        m.score(f)
    with pytest.raises(ConfigError, match="precision"):
        el.ExactLowpMatcher(
            gallery_from(f.levels, f.pooled, c), k_image=1, k_gallery=1, precision="fp8"
        )


# ----------------------------------------------------------------------------- selection
def test_cpu_flags_from_cpuinfo(tmp_path: Path) -> None:
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni amx_bf16\n")
    flags = cpu_features._proc_cpuinfo(p)
    assert flags is not None and {"avx512_vnni", "amx_bf16"} <= flags
    assert cpu_features._proc_cpuinfo(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ("fpu sse2 avx avx2 fma", "numpy"),  # AVX2 only: fp32 BLAS, nothing slower than today
        ("", "numpy"),
        ("avx2 avx_vnni", "exact-int8"),
        ("avx512f avx512_vnni", "exact-int8"),
        ("avx512f avx512_vnni amx_int8", "exact-int8"),
        ("avx512f avx512_vnni avx512_bf16", "exact-bf16" if HAS_OV else "exact-int8"),
        ("amx_bf16 amx_int8 amx_tile", "exact-bf16" if HAS_OV else "exact-int8"),
    ],
)
def test_auto_matcher_follows_the_cpu_units(flags: str, want: str) -> None:
    assert autoselect.select_matcher(cpu_features.cpu_units(flags))[0] == want


def test_auto_falls_back_to_numpy_without_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without bf16/int8 units (simulated): ``auto`` gives the NumPy oracle unchanged."""
    monkeypatch.setenv(cpu_features.ENV_FLAGS, "sse2 avx avx2 fma")
    rng = np.random.default_rng(5)
    c = make_contract([(4, 4, 8)], 4, 16)
    f = random_features(rng, c, 3)
    m = open_matcher(gallery_from(f.levels, f.pooled, c), "auto", k_image=1, k_gallery=1)
    assert type(m) is NumpyMatcher
    sel = autoselect.select()
    assert (sel.backend, sel.matcher) == ("ort", "numpy")
    assert sel.cpu["source"] == cpu_features.ENV_FLAGS and not sel.cpu["int8"]
    monkeypatch.setenv(cpu_features.ENV_FLAGS, "avx512_vnni")
    m = open_matcher(gallery_from(f.levels, f.pooled, c), "auto", k_image=1, k_gallery=1)
    assert isinstance(m, el.ExactInt8Matcher)


def test_tables_list_the_new_backends() -> None:
    from spade_edge.runtime.runners import RUNNERS

    assert {"exact-int8", "exact-bf16"} <= set(MATCHERS)
    assert {"openvino", "openvino-bf16", "openvino-int8"} <= set(RUNNERS)

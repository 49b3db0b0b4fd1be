"""kNN matchers, chosen from one table (see ``MATCHERS``)."""

from __future__ import annotations

from typing import Any

from spade_edge.runtime.autoselect import select_matcher
from spade_edge.runtime.matchers.base import DEFAULT_K, GalleryArrays, Matcher, Score
from spade_edge.runtime.registry import build_backend

#: backend name -> "module:class". Every matcher takes (gallery, k_image=, k_gallery=, sigma=)
#: (base.KnnMatcher) plus its own keyword-only options.
MATCHERS: dict[str, str] = {
    "numpy": "spade_edge.runtime.matchers.numpy_matcher:NumpyMatcher",
    "cuda": "spade_edge.runtime.matchers.cuda:CudaMatcher",
    "exact-int8": "spade_edge.runtime.matchers.exact_lowp:ExactInt8Matcher",
    "exact-bf16": "spade_edge.runtime.matchers.exact_lowp:ExactBf16Matcher",
}


def open_matcher(gallery: GalleryArrays, backend: str = "numpy", **options: Any) -> Matcher:
    """Build the matcher ``backend`` over ``gallery`` (K values etc. in ``options``).

    ``auto`` picks the fastest exact matcher for this CPU (runtime/autoselect.py). An option
    the backend does not take is a ConfigError naming it.
    """
    if backend == "auto":
        backend = select_matcher()[0]
    matcher: Matcher = build_backend(MATCHERS, backend, "matcher", gallery, **options)
    return matcher


__all__ = ["DEFAULT_K", "MATCHERS", "GalleryArrays", "Matcher", "Score", "open_matcher"]

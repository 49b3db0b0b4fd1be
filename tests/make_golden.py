"""Regenerate tests/data/golden_v1.bin, the frozen gallery v1 (``python tests/make_golden.py``).

Why: if the writer changes the format by accident (field order, padding, dtypes, hashing),
test_gallery.py's golden tests fail. Only regenerate on a deliberate, documented format change
(and bump GALLERY_VERSION). All values are small multiples of 1/8, exact in fp16, so the
stored norms are exact too and the file is byte-identical on every machine.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.contract import Contract, Level

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_v1.bin"
CREATED = "2024-01-01T00:00:00Z"
FINGERPRINT = hashlib.sha256(b"spade-edge golden model").hexdigest()


def golden_inputs() -> dict[str, Any]:
    """Keyword arguments of write_gallery that produce the golden file."""
    contract = Contract(
        backbone="golden",
        weights="none",
        levels=(Level(name="layer1", stride=4, channels=3, height=2, width=2),),
        pooled_dim=4,
        image_size=8,
        resize=9,
    )
    n = 2
    pooled = (np.arange(n * 4, dtype=np.float32).reshape(n, 4) - 3.0) / 8.0
    level = (np.arange(n * 2 * 2 * 3, dtype=np.float32).reshape(n, 2, 2, 3) - 10.0) / 4.0
    sources = [
        {"name": f"good/{i:03d}.png", "sha256": hashlib.sha256(f"image {i}".encode()).hexdigest()}
        for i in range(n)
    ]
    return {
        "contract": contract,
        "fingerprint": FINGERPRINT,
        "pooled": pooled,
        "levels": [level],
        "sources": sources,
        "default_k": 5,
        "thresholds": {"image": 0.5},
        "extra": {"note": "golden"},
        "created": CREATED,
    }


def write_golden(path: Path = GOLDEN) -> Path:
    from spade_edge.runtime.gallery import write_gallery

    write_gallery(path, **golden_inputs())
    return path


if __name__ == "__main__":
    out = write_golden(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN)
    print(f"wrote {out} ({out.stat().st_size} bytes)")

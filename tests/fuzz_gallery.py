"""Mutation helpers and the gallery fuzz target (``python tests/fuzz_gallery.py -n 10000``).

The fuzz target opens thousands of mutated gallery files (bit flips, truncations, header field
overwrites, manifest JSON edits with and without a repaired checksum, appended bytes) and
counts a *crash* whenever opening or reading raises anything but a spade-edge error
(FormatError/SpadeError). In pytest it runs as ``test_gallery.py::test_fuzz_10000`` under the
``fuzz`` marker, outside the default run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.runtime.container import HEADER, HEADER_SIZE
from spade_edge.runtime.errors import SpadeError

#: (name, offset, size) of every fixed header field.
HEADER_FIELDS = [
    ("magic", 0, 8),
    ("version", 8, 4),
    ("flags", 12, 4),
    ("manifest_length", 16, 8),
    ("manifest_sha256", 24, 32),
]


def split(data: bytes) -> tuple[tuple[Any, ...], dict[str, Any], int]:
    """(header fields, parsed container table, data start) of a valid container."""
    hdr = HEADER.unpack(data[:HEADER_SIZE])
    mlen = hdr[3]
    table = json.loads(data[HEADER_SIZE : HEADER_SIZE + mlen])
    a = table["alignment"]
    return hdr, table, -(-(HEADER_SIZE + mlen) // a) * a


def with_manifest(data: bytes, manifest: dict[str, Any] | bytes, fix_hash: bool = True) -> bytes:
    """Replace the manifest of a valid container, keeping the blob bytes where they were.

    ``manifest`` is the whole container table (dict, re-encoded like the writer does) or raw
    bytes. The header's length (and, with ``fix_hash``, checksum) is updated so the edit gets
    past the checksum and exercises the validation behind it. If the new manifest no longer
    fits before the data, the data moves (and the offsets become wrong, which is fine here).
    """
    hdr, _, start = split(data)
    if isinstance(manifest, dict):
        mb = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    else:
        mb = manifest
    sha = hashlib.sha256(mb).digest() if fix_hash else hdr[4]
    head = HEADER.pack(hdr[0], hdr[1], hdr[2], len(mb), sha) + mb
    pad = max(0, start - len(head))
    return head + b"\0" * pad + data[start:]


def set_header_field(data: bytes, name: str, value: bytes) -> bytes:
    off, size = next((o, s) for n, o, s in HEADER_FIELDS if n == name)
    assert len(value) == size
    return data[:off] + value + data[off + size :]


# ------------------------------------------------------------------------------- mutators

_WEIRD: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    7,
    4095,
    4096,
    1 << 31,
    (1 << 31) + 1,
    1 << 63,
    1 << 64,
    10**30,
    -(10**30),
    0.5,
    1e308,
    -0.0,
    "",
    "x",
    "<f2",
    "<f4",
    "|u1",
    "|O",
    ">f4",
    "<c8",
    "a" * 64,
    "0" * 64,
    [],
    [0],
    [-1],
    [1 << 40],
    [1, 2, 3],
    {},
    {"a": 1},
]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, (*prefix, i))
    return out


def _json_edit(table: dict[str, Any], rng: random.Random) -> dict[str, Any] | bytes:
    t = json.loads(json.dumps(table))
    paths = [p for p in _paths(t) if p]
    path = rng.choice(paths)
    parent = t
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    op = rng.random()
    if op < 0.55:
        parent[last] = rng.choice(_WEIRD)
    elif op < 0.7 and isinstance(parent, dict):
        del parent[last]
    elif op < 0.8 and isinstance(parent, dict):
        parent[rng.choice(["zz", "extra_key", "blobs", "n"])] = rng.choice(_WEIRD)
    elif op < 0.9 and isinstance(parent[last], int) and not isinstance(parent[last], bool):
        parent[last] = parent[last] + rng.choice([-4096, -1, 1, 4096, 1 << 32])
    elif isinstance(parent, list):
        parent.append(json.loads(json.dumps(parent[last])))
    else:
        text = json.dumps(t, sort_keys=True, separators=(",", ":")).encode()
        i = rng.randrange(len(text))
        return text[:i] + bytes([rng.randrange(256)]) + text[i + 1 :]
    return t


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a valid container: (kind, new bytes)."""
    kind = rng.choice(
        ["bitflip", "bitflip_header", "truncate", "header_field", "json", "json_raw", "append"]
    )
    b = bytearray(data)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "bitflip_header":
        _, _, start = split(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(start)
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "header_field":
        name, _, size = rng.choice(HEADER_FIELDS)
        choice = rng.random()
        if choice < 0.5:
            val = rng.randbytes(size)
        else:
            v = rng.choice([0, 1, 2, 55, 56, 4096, (1 << 24), (1 << (8 * size)) - 1])
            val = (v % (1 << (8 * size))).to_bytes(size, "little")
        return kind, set_header_field(data, name, val)
    if kind in ("json", "json_raw"):
        _, table, _ = split(data)
        edited = _json_edit(table, rng)
        return kind, with_manifest(data, edited, fix_hash=(kind == "json" or rng.random() < 0.5))
    return kind, data + rng.randbytes(rng.randint(1, 64))


def exercise_gallery(path: Path, verify: bool) -> None:
    """Everything a consumer does with an opened gallery (must not crash on any file)."""
    from spade_edge.runtime.gallery import Gallery, describe

    with Gallery.open(path, verify=verify) as g:
        _ = g.sources
        _ = describe(g)
        float(np.asarray(g.pooled[:1], dtype=np.float32).sum())
        for lv in g.levels:
            float(np.asarray(lv[-1:], dtype=np.float32).sum())


def run_fuzz(
    n: int,
    seed: int = 0,
    seeds: list[bytes] | None = None,
    exercise: Callable[[Path, bool], None] = exercise_gallery,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Open ``n`` mutated files; returns counts per outcome and the crashes (if any)."""
    rng = random.Random(seed)
    if seeds is None:
        sys.path.insert(0, str(Path(__file__).parent / "data"))
        from make_golden import GOLDEN

        seeds = [GOLDEN.read_bytes()]
    crashes: list[tuple[str, str]] = []
    outcomes = {"rejected": 0, "opened": 0}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "fuzz.bin"
        for _ in range(n):
            kind, data = mutate(rng.choice(seeds), rng)
            path.write_bytes(data)
            try:
                exercise(path, rng.random() < 0.5)
                outcomes["opened"] += 1
            except SpadeError:
                outcomes["rejected"] += 1
            except Exception as e:  # a crash: any other exception type
                crashes.append((kind, f"{type(e).__name__}: {e}"))
    return {"files": n, "crashes": crashes, **outcomes}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    r = run_fuzz(args.n, args.seed)
    dt = time.perf_counter() - t0
    print(
        f"{r['files']} files, {len(r['crashes'])} crashes "
        f"({r['rejected']} rejected, {r['opened']} opened) in {dt:.1f} s"
    )
    for kind, msg in r["crashes"][:20]:
        print(f"  {kind}: {msg}")
    sys.exit(1 if r["crashes"] else 0)

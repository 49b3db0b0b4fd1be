"""Mutation helpers and the container fuzz targets (``python tests/fuzz_gallery.py -n 10000``).

Three targets share the mutations (bit flips, truncations, header field overwrites, manifest
JSON edits with and without a repaired checksum, appended bytes):

* ``gallery``: open and read mutated gallery files;
* ``engine``: open, verify and describe mutated TensorRT engine files (runtime/engine_file.py);
* ``copy``: the paths that copy blobs out of an existing gallery into a new, freshly
  checksummed file -- ``--add-to`` (``append_gallery``), threshold recalibration
  (``calibrate_gallery``) and ``rewrite_gallery`` -- over mutated galleries. Besides crashes it
  checks the laundering property: a new file that verifies may only come from an input that
  verifies itself.

A *crash* is anything but a spade-edge error (FormatError/SpadeError), including a laundered
file. In pytest the 10,000-file runs are under the ``fuzz`` marker (``make fuzz``); the default
run keeps a few hundred files per target.
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


class LaunderedError(Exception):
    """A mutated (invalid) input came out as a new file that verifies."""


def exercise_engine(path: Path, verify: bool) -> None:
    """Everything a consumer does with an engine file before TensorRT sees it."""
    from spade_edge.runtime.engine_file import describe, read_engine_file

    with read_engine_file(path, verify=verify) as ef:
        _ = ef.metadata
        _ = ef.parent_fingerprint
        int(ef.plan()[:1].sum())
        ef.check_runtime(ef.tensorrt_version, ef.compute_capability, ef.gpu_name)
    describe(path, verify=verify)


def _verifies(path: Path) -> bool:
    from spade_edge.runtime.gallery import Gallery

    try:
        with Gallery.open(path, verify=True):
            return True
    except SpadeError:
        return False


def exercise_copy(path: Path, verify: bool) -> None:
    """--add-to, threshold recalibration and rewrite over ``path``; raise LaunderedError if a new
    file verifies although ``path`` does not. Rejections are SpadeErrors as usual."""
    from spade_edge.runtime.gallery import Gallery, append_gallery, rewrite_gallery
    from spade_edge.runtime.thresholds import calibrate_gallery

    outs = [path.with_name(f"out{i}.bin") for i in range(3)]
    for o in outs:
        o.unlink(missing_ok=True)
    errors: list[SpadeError] = []
    try:
        with Gallery.open(path, verify=verify) as g:
            try:
                rewrite_gallery(g, outs[0], thresholds=None)
            except SpadeError as e:
                errors.append(e)
            try:
                new = [
                    {
                        "name": "fuzz-new.png",
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    }
                ]
                levels = [np.ones((1, *lv.shape[1:]), np.float32) for lv in g.levels]
                append_gallery(g, outs[1], np.ones((1, g.pooled.shape[1]), np.float32), levels, new)
            except SpadeError as e:
                errors.append(e)
    except SpadeError as e:
        errors.append(e)
    try:
        calibrate_gallery(path, outs[2], k_image=2, k_gallery=2)
    except SpadeError as e:
        errors.append(e)
    made = [o for o in outs if o.exists() and _verifies(o)]
    if made and not _verifies(path):
        raise LaunderedError(f"{[o.name for o in made]} verify, but the input does not")
    if errors and not made:
        raise errors[0]


def engine_seed(workdir: Path) -> bytes:
    """A valid engine file (tiny contract, a 10 KiB stand-in plan)."""
    from tiny_model import tiny_contract

    from spade_edge.runtime.engine_file import TensorSpec, write_engine_file

    c = tiny_contract(32)
    s = c.image_size
    outputs = [
        TensorSpec(lv.name, "float32", (-1, lv.height, lv.width, lv.channels)) for lv in c.levels
    ]
    outputs.append(TensorSpec(c.pooled_name, "float32", (-1, c.pooled_dim)))
    p = workdir / "seed.engine"
    write_engine_file(
        p,
        bytes(range(256)) * 40,
        contract=c,
        fingerprint="ab" * 32,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability=(8, 7),
        inputs=[TensorSpec(c.input_name, "float32", (-1, 3, s, s))],
        outputs=outputs,
        max_batch=8,
        created="2026-01-01T00:00:00Z",
    )
    return p.read_bytes()


def copy_seed(workdir: Path, n: int = 11) -> bytes:
    """A valid gallery big enough for leave-one-out thresholds (tiny contract)."""
    from tiny_model import tiny_contract

    from spade_edge.runtime.gallery import write_gallery

    c = tiny_contract(32)
    rng = np.random.default_rng(0)
    p = workdir / "seed.bin"
    write_gallery(
        p,
        c,
        "cd" * 32,
        rng.normal(size=(n, c.pooled_dim)).astype(np.float32),
        [rng.normal(size=(n, lv.height, lv.width, lv.channels)) for lv in c.levels],
        [{"name": f"{i}.png", "sha256": hashlib.sha256(bytes([i])).hexdigest()} for i in range(n)],
        default_k=2,
        thresholds={"image": 1.0, "n_normal": n},
        created="2026-01-01T00:00:00Z",
    )
    return p.read_bytes()


TARGETS: dict[str, Callable[[Path, bool], None]] = {
    "gallery": exercise_gallery,
    "engine": exercise_engine,
    "copy": exercise_copy,
}


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


def seeds_for(target: str, workdir: Path) -> list[bytes] | None:
    """Seed files of a target (None: the golden gallery)."""
    if target == "engine":
        return [engine_seed(workdir)]
    if target == "copy":
        return [copy_seed(workdir)]
    return None


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", choices=sorted(TARGETS), default="gallery")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as seed_dir:
        seed_files = seeds_for(args.target, Path(seed_dir))
        r = run_fuzz(args.n, args.seed, seed_files, TARGETS[args.target])
    dt = time.perf_counter() - t0
    print(
        f"{args.target}: {r['files']} files, {len(r['crashes'])} crashes "
        f"({r['rejected']} rejected, {r['opened']} opened) in {dt:.1f} s"
    )
    for kind, msg in r["crashes"][:20]:
        print(f"  {kind}: {msg}")
    sys.exit(1 if r["crashes"] else 0)

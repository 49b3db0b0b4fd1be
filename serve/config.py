"""Every spade-serve option in one validated dataclass (the CLI and ``create_app`` share it)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from spade_edge.runtime.errors import ConfigError, InputError

KEEP_IMAGES = ("anomalous", "all", "none")
#: Image formats accepted on the wire (sniffed from the bytes, never from Content-Type).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (the only default-safe binds)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path) -> str:
    """The bearer token: the file's first line, stripped; empty or unreadable is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read token file ({getattr(e, 'strerror', e)})") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 8:
        raise InputError(f"{path}: token file must hold a token of at least 8 characters")
    return token


@dataclass
class ServeConfig:
    """Options of ``spade-serve MODEL GALLERY`` (see docs/serve.md for each)."""

    model: Path
    gallery: Path
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "auto"
    matcher: str = "numpy"
    k: int | None = None
    archive: Path = Path("spade-archive")
    token: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    queue: int = 64
    station: str | None = None
    keep_images: str = "all"
    image_budget_mb: float = 1024.0
    max_body_mb: float = 32.0
    timeout_s: float = 30.0
    decode_workers: int = 2
    insecure: bool = False
    verify: bool = True  # checksums + finiteness of each gallery version before serving it

    def validate(self) -> ServeConfig:
        """Refuse nonsense before anything is loaded; one message per bad option."""

        def positive(name: str, v: float, integer: bool = False) -> None:
            if isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {v!r}")
            if integer and int(v) != v:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer, got {v!r}")

        for name in ("max_batch", "queue", "decode_workers"):
            positive(name, getattr(self, name), integer=True)
        for name in ("image_budget_mb", "max_body_mb", "timeout_s"):
            positive(name, getattr(self, name))
        if not math.isfinite(self.max_wait_ms) or self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms!r}")
        if self.k is not None:
            positive("k", self.k, integer=True)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.keep_images not in KEEP_IMAGES:
            raise ConfigError(
                f"--keep-images must be one of {', '.join(KEEP_IMAGES)}, got {self.keep_images!r}"
            )
        if self.station is not None and (not self.station or len(self.station) > 128):
            raise ConfigError("--station must be 1..128 characters")
        if not is_loopback(self.host) and self.token is None and not self.insecure:
            raise ConfigError(
                f"--host {self.host} is not a loopback address: pass --token-file (state changes "
                "need a token) or --insecure to expose an unauthenticated service"
            )
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def image_budget_bytes(self) -> int:
        return int(self.image_budget_mb * 1024 * 1024)


__all__ = ["ACCEPTED_FORMATS", "KEEP_IMAGES", "ServeConfig", "is_loopback", "read_token"]

"""Parsing of ``--source`` / ``--sink`` specs: ``KIND:TARGET`` with optional ``?k=v&k=v`` options.

Why one parser: every source and sink spec follows the same shape, and a bad spec must give one
clear line naming the spec and what is wrong (an ``InputError``), never a traceback.
Options go after the last ``?`` when every pair in it is ``key=value`` with a key the kind
knows; an unknown key is an error, except in a camera/webhook URL, whose own query string it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

from spade_edge.runtime.errors import ConfigError

N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Spec:
    """One parsed spec: ``kind`` (``watch``, ``mqtt``, ...), ``target`` and its options."""

    text: str
    kind: str
    target: str
    options: dict[str, str] = field(default_factory=dict)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        """A finite numeric option >= ``minimum`` (``ConfigError`` naming the spec otherwise)."""
        return self._option(key, default, minimum, float, "a number")

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        """An integer option >= ``minimum`` (``ConfigError`` naming the spec otherwise)."""
        return self._option(key, default, minimum, int, "an integer")

    def _option(
        self, key: str, default: N, minimum: N, convert: Callable[[str], N], what: str
    ) -> N:
        raw = self.options.get(key)
        if raw is None:
            return default
        try:
            value = convert(raw)
        except ValueError:
            raise ConfigError(f"{self.text}: option {key}={raw!r} is not {what}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise ConfigError(f"{self.text}: option {key}={raw!r} must be {what} >= {minimum}")
        return value


def host_port(spec: Spec, default_port: int, usage: str) -> tuple[str, int, str]:
    """(host, port, path) of a URL spec; ``ConfigError`` showing ``usage`` when it is not one."""
    url = urlsplit(spec.target)
    if not url.hostname:
        raise ConfigError(f"sink {spec.text!r}: expected {usage}")
    try:
        port = url.port or default_port
    except ValueError:
        raise ConfigError(f"sink {spec.text!r}: bad port") from None
    return url.hostname, port, url.path


def parse_spec(text: str, kinds: dict[str, Iterable[str]], what: str) -> Spec:
    """Split ``text`` into kind/target/options; ``kinds`` maps each kind to its option keys.

    URL kinds (``mqtt://…``, ``opcua://…``) keep the whole URL as their target.
    """
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in kinds:
        known = ", ".join(f"{k}:…" for k in sorted(kinds))
        raise ConfigError(f"{what} {text!r}: unknown kind (expected one of {known})")
    target, options = rest, {}
    head, q, tail = rest.rpartition("?")
    if q:
        pairs = parse_qsl(tail, keep_blank_values=True)
        allowed = set(kinds[kind])
        if pairs and "=" in tail and all(k in allowed for k, _ in pairs):
            target, options = head, dict(pairs)
        elif pairs and ("://" not in rest or kind in ("mqtt", "opcua")):
            bad = sorted({k for k, _ in pairs} - allowed)
            raise ConfigError(
                f"{what} {text!r}: unknown option(s) {', '.join(bad)} "
                f"(known: {', '.join(sorted(allowed)) or 'none'})"
            )
    if kind in ("mqtt", "opcua"):
        target = f"{kind}:{target}"
    if not target.strip():
        raise ConfigError(f"{what} {text!r}: nothing after '{kind}:'")
    return Spec(text=text, kind=kind, target=target, options=options)

"""Service errors: typed like the runtime's, each with the HTTP status the API answers with."""

from __future__ import annotations

from spade_edge.runtime.errors import InputError, SpadeError


class ServiceError(SpadeError):
    """Base of errors that are about the service's state, not the caller's input."""

    http_status = 500


class OverloadedError(ServiceError):
    """The inference queue is full: retry later (503 + Retry-After)."""

    http_status = 503


class NotReadyError(ServiceError):
    """Model and gallery are not loaded yet, or the service is shutting down (503)."""

    http_status = 503


class RequestTimeoutError(ServiceError):
    """A request waited longer than the per-request timeout (504)."""

    http_status = 504


class NotFoundError(InputError):
    """No such result, image or gallery version (404)."""

    http_status = 404


class ConflictError(InputError):
    """The request is valid but cannot be applied to the current state (409)."""

    http_status = 409


class TooLargeError(InputError):
    """The request body is larger than ``--max-body-mb`` (413)."""

    http_status = 413


class UnauthorizedError(InputError):
    """A state-changing request without the right bearer token (401)."""

    http_status = 401


def http_status(err: Exception) -> int:
    """The status code the API answers a typed error with (400 for other input errors)."""
    code = getattr(err, "http_status", None)
    if isinstance(code, int):
        return code
    if isinstance(err, InputError):
        return 400
    return 500


__all__ = [
    "ConflictError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "RequestTimeoutError",
    "ServiceError",
    "TooLargeError",
    "UnauthorizedError",
    "http_status",
]

"""Typed errors. Library code raises these; only the CLIs turn them into messages and exit codes.

Every message names the file (or setting) at fault and what is wrong with it, in one line.
"""

from __future__ import annotations


class SpadeError(Exception):
    """Base of every error spade-edge raises on purpose (never a bare traceback for users)."""

    exit_code = 1


class InputError(SpadeError):
    """A user-supplied input (image, folder, option value) is missing or unusable."""

    exit_code = 2


class ImageDecodeError(InputError):
    """An image file cannot be read or decoded."""


class FormatError(SpadeError):
    """An artifact (gallery, engine, model) is corrupt, truncated or of an unknown format."""

    exit_code = 3


class CompatibilityError(SpadeError):
    """Two artifacts do not belong together (fingerprints, TensorRT version, GPU, precision)."""

    exit_code = 4


class BackendUnavailableError(SpadeError):
    """A backend that was asked for cannot run here (package or device missing)."""

    exit_code = 5


class WeightsError(SpadeError):
    """Backbone weights cannot be fetched, verified or loaded."""

    exit_code = 6


class ExportError(SpadeError):
    """Export to ONNX/TensorRT failed (including the built-in parity check)."""

    exit_code = 7


class CalibrationError(SpadeError):
    """INT8 calibration or threshold estimation cannot proceed (e.g. too few images)."""

    exit_code = 8


class ConfigError(InputError):
    """An option value is out of range (e.g. K larger than the gallery)."""

"""The preprocessing contract: what a model expects and what it outputs, as versioned JSON.

It is written into the ONNX metadata by ``spade-export`` and copied into galleries and engines,
so preprocessing is always read from an artifact, never guessed.

Layout decision: feature maps leave the model **channels-last** ``[B, H, W, C]`` so that every
spatial position is one contiguous vector, which is what both matchers (NumPy GEMM and the CUDA
kernel) consume. The input is ``[B, 3, H, W]`` float32, RGB, already normalised with mean/std.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from spade_edge.runtime.errors import FormatError

CONTRACT_VERSION = 1
METADATA_CONTRACT_KEY = "spade_edge.contract"
METADATA_FINGERPRINT_KEY = "spade_edge.fingerprint"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Level:
    """One pyramid level as the model outputs it (channels-last)."""

    name: str
    stride: int
    channels: int
    height: int
    width: int

    @property
    def positions(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class Contract:
    """Everything needed to feed a model and read its outputs."""

    backbone: str
    weights: str
    levels: tuple[Level, ...]
    pooled_dim: int
    image_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_name: str = "image"
    pooled_name: str = "pooled"
    input_layout: str = "NCHW"
    input_dtype: str = "float32"
    color: str = "RGB"
    resize_interpolation: str = "bilinear"
    antialias: bool = True
    output_layout: str = "NHWC"
    precision: str = "fp32"
    parent_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = CONTRACT_VERSION

    @property
    def output_names(self) -> list[str]:
        return [lv.name for lv in self.levels] + [self.pooled_name]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = [asdict(lv) for lv in self.levels]
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def summary(self) -> dict[str, Any]:
        """The fields people look for first (spade-inspect of models, galleries, engines)."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "precision": self.precision,
            "image_size": self.image_size,
            "resize": self.resize,
            "levels": [
                {"name": lv.name, "stride": lv.stride, "shape": [lv.height, lv.width, lv.channels]}
                for lv in self.levels
            ],
            "pooled_dim": self.pooled_dim,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def with_precision(self, precision: str, parent_fingerprint: str) -> Contract:
        return replace(self, precision=precision, parent_fingerprint=parent_fingerprint)

    @classmethod
    def from_dict(cls, d: Any, source: str = "contract") -> Contract:
        """Validate and build; ``source`` names the file for error messages."""
        if not isinstance(d, dict):
            raise FormatError(f"{source}: preprocessing contract is not a JSON object")
        version = d.get("version")
        if version != CONTRACT_VERSION:
            raise FormatError(
                f"{source}: contract version {version!r} is not supported "
                f"(this spade-edge reads version {CONTRACT_VERSION})"
            )
        try:
            levels = tuple(
                Level(
                    name=str(lv["name"]),
                    stride=_pos_int(lv["stride"], "stride"),
                    channels=_pos_int(lv["channels"], "channels"),
                    height=_pos_int(lv["height"], "height"),
                    width=_pos_int(lv["width"], "width"),
                )
                for lv in d["levels"]
            )
            mean = tuple(float(x) for x in d["mean"])
            std = tuple(float(x) for x in d["std"])
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError("mean/std must be 3 numbers, std > 0")
            if not levels:
                raise ValueError("no pyramid levels")
            c = cls(
                backbone=str(d["backbone"]),
                weights=str(d["weights"]),
                levels=levels,
                pooled_dim=_pos_int(d["pooled_dim"], "pooled_dim"),
                image_size=_pos_int(d["image_size"], "image_size"),
                resize=_pos_int(d["resize"], "resize"),
                mean=mean,
                std=std,
                input_name=str(d.get("input_name", "image")),
                pooled_name=str(d.get("pooled_name", "pooled")),
                input_layout=str(d.get("input_layout", "NCHW")),
                input_dtype=str(d.get("input_dtype", "float32")),
                color=str(d.get("color", "RGB")),
                resize_interpolation=str(d.get("resize_interpolation", "bilinear")),
                antialias=bool(d.get("antialias", True)),
                output_layout=str(d.get("output_layout", "NHWC")),
                precision=str(d.get("precision", "fp32")),
                parent_fingerprint=d.get("parent_fingerprint"),
                extra=dict(d.get("extra") or {}),
                version=CONTRACT_VERSION,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{source}: invalid preprocessing contract: {e}") from None
        if c.resize < c.image_size:
            raise FormatError(f"{source}: contract resize {c.resize} < crop {c.image_size}")
        return c

    @classmethod
    def from_json(cls, text: str, source: str = "contract") -> Contract:
        return cls.from_dict(parse_json(text, source, "contract"), source)


def parse_json(text: str | bytes, source: str, what: str) -> Any:
    """``json.loads`` for metadata records: bad text is a FormatError naming ``source`` and
    ``what`` (also for nesting too deep to parse), never a traceback."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{source}: {what} is not valid JSON: {e}") from None


def _pos_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > 1 << 20:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def resize_for(image_size: int) -> int:
    """SPADE's resize side for a crop size: 256 for 224, scaled the same way otherwise."""
    return round(image_size * 256 / 224)

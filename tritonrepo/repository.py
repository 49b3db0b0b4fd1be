"""Write a Triton model repository for a spade-edge model and gallery (``spade-triton``).

Layout (docs/triton.md)::

    REPO/spade/config.pbtxt              Python backend, batching, instances, I/O
    REPO/spade/<v>/model.py              spade_edge.triton.model
    REPO/spade/<v>/spade.json            what this version runs (files, backends, K)
    REPO/spade/<v>/model.onnx|.engine    the model, copied
    REPO/spade/<v>/gallery.bin           the gallery, copied: a gallery version is a model version
    REPO/spade/<v>/site/spade_edge/...   the spade_edge code it was written with (optional)
    REPO/spade_backbone/...              the same model returning features (``triton`` runner)

Each call writes the next version (or ``version``); a version folder appears complete or not
at all (written beside it, then renamed), so a server under ``--model-control-mode=explicit``
loads it with ``POST /v2/repository/models/spade/load`` while the old one keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import spade_edge.runtime as rt
from spade_edge.runtime.contract import Contract
from spade_edge.runtime.detector import Detector
from spade_edge.runtime.engine_file import read_engine_file
from spade_edge.runtime.errors import CompatibilityError, InputError
from spade_edge.runtime.fileio import utc_timestamp, write_atomic
from spade_edge.runtime.runners import RUNNERS, auto_backend

MODEL = "spade"
BACKBONE = "spade_backbone"
MANIFEST = "spade.json"
KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class RepoOptions:
    """What ``spade-triton`` sets; the defaults suit one CPU instance."""

    instances: int = 1
    kind: str = "cpu"  # cpu: ONNX Runtime + NumPy; gpu: TensorRT (or ORT-GPU) + CUDA matcher
    gpus: tuple[int, ...] = ()
    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    k_image: int | None = None
    k_gallery: int | None = None
    matcher: str | None = None  # default: numpy on CPU, cuda on GPU
    backend: str | None = None  # runner of --kind's instances (default: ort on CPU, trt on GPU)
    engine: Path | None = None  # TensorRT engine for KIND_GPU instances
    backbone: bool = True  # also write spade_backbone (the triton runner's model)
    bundle: bool = True  # copy spade_edge's code into each version (site/)
    version: int | None = None

    def check(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.instances < 1:
            raise InputError(f"--instances must be >= 1, got {self.instances}")
        if self.max_batch_size < 1:
            raise InputError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise InputError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if self.gpus and self.kind != "gpu":
            raise InputError("--gpus needs --kind gpu")
        if self.backend is not None and (self.backend not in RUNNERS or self.backend == "triton"):
            usable = ", ".join(b for b in RUNNERS if b != "triton")
            raise InputError(f"--backend {self.backend!r}: choose one of {usable}")
        if self.version is not None and self.version < 1:
            raise InputError(f"--version must be >= 1, got {self.version}")


@dataclass(frozen=True)
class WrittenVersion:
    repository: Path
    version: int
    folder: Path
    backbone_version: int | None


def _pb_str(s: str) -> str:
    """A protobuf text-format string literal (JSON escapes are valid C escapes for it)."""
    return json.dumps(s, allow_nan=False)


def _instance_group(o: RepoOptions) -> str:
    kind = "KIND_GPU" if o.kind == "gpu" else "KIND_CPU"
    gpus = f" gpus: [ {', '.join(map(str, o.gpus))} ]" if o.gpus else ""
    return f"instance_group [ {{ count: {o.instances} kind: {kind}{gpus} }} ]"


def _config(
    name: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    o: RepoOptions,
    parameters: dict[str, str],
) -> str:
    def tensors(ts: Sequence[tuple[str, str, Sequence[int]]]) -> str:
        return ",\n".join(
            f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ] }}'
            for n, t, d in ts
        )

    params = "\n".join(
        f"parameters {{ key: {_pb_str(k)} value: {{ string_value: {_pb_str(v)} }} }}"
        for k, v in parameters.items()
    )
    return (
        f"# written by spade-triton; see docs/triton.md\n"
        f'name: "{name}"\n'
        f'backend: "python"\n'
        f"max_batch_size: {o.max_batch_size}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {o.max_queue_delay_us} }}\n"
        f"input [\n{tensors(inputs)}\n]\n"
        f"output [\n{tensors(outputs)}\n]\n"
        f"{_instance_group(o)}\n"
        f"version_policy: {{ latest: {{ num_versions: 1 }} }}\n"
        f"{params}\n"
    )


def spade_config(contract: Contract, o: RepoOptions) -> str:
    """config.pbtxt of the ``spade`` model (encoded image in, score/verdict/map out)."""
    s = contract.image_size
    return _config(
        MODEL,
        [("IMAGE", "TYPE_STRING", [1])],
        [
            ("SCORE", "TYPE_FP32", [1]),
            ("ANOMALOUS", "TYPE_INT8", [1]),
            ("ANOMALY_MAP", "TYPE_FP32", [s, s]),
        ],
        o,
        {"spade_contract": contract.to_json()},
    )


def backbone_config(contract: Contract, fingerprint: str, o: RepoOptions) -> str:
    """config.pbtxt of ``spade_backbone``: the model's own I/O names, contract in parameters."""
    s = contract.image_size
    outs = [(lv.name, "TYPE_FP32", [lv.height, lv.width, lv.channels]) for lv in contract.levels]
    outs.append((contract.pooled_name, "TYPE_FP32", [contract.pooled_dim]))
    return _config(
        BACKBONE,
        [(contract.input_name, "TYPE_FP32", [3, s, s])],
        outs,
        o,
        {"spade_contract": contract.to_json(), "spade_fingerprint": fingerprint},
    )


def versions(model_dir: Path) -> list[int]:
    """Numeric version folders of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def bundle_site(dest: Path) -> list[str]:
    """Copy the spade_edge runtime package into ``dest/spade_edge/runtime`` (pure Python + the
    CUDA kernel sources); the import contracts keep the runtime free of the layers above it.

    Why: Triton's stub imports spade_edge from the version folder, so a version always runs
    the code it was written and tested with, whatever is installed in the stub's Python.
    """
    src = Path(rt.__file__).resolve().parent
    shutil.copytree(
        src, dest / "spade_edge" / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return ["runtime"]


def _copy(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        raise InputError(f"{src}: cannot copy into the repository: {e.strerror or e}") from None


def _sides(model: Path, o: RepoOptions) -> tuple[dict[str, str], dict[str, str]]:
    is_engine = auto_backend(model) == "trt"
    cpu = {"backend": "ort", "matcher": o.matcher or "numpy"}
    if o.engine is not None or is_engine:
        gpu = {"backend": "trt", "matcher": o.matcher or "cuda"}
    else:
        gpu = {"backend": "ort-gpu", "matcher": o.matcher or "cuda"}
    if o.backend is not None:
        (gpu if o.kind == "gpu" else cpu)["backend"] = o.backend
    return cpu, gpu


@dataclass(frozen=True)
class _Served:
    """The model + gallery pair as the server will load it."""

    contract: Contract
    fingerprint: str  # the ONNX model's
    settings: dict[str, Any]  # gallery size, K, thresholds: recorded in the version manifest


def _load_as_served(model: Path, gallery: Path, o: RepoOptions) -> _Served:
    """Load model + gallery as the server will (ORT Detector, with runtime/compat.py's
    compatibility rule), so a mismatch fails here, not at load."""
    with Detector.load(
        model, gallery, backend="ort", k_image=o.k_image, k_gallery=o.k_gallery
    ) as det:
        settings = {
            "gallery_images": int(det.gallery.n_images),
            "k_image": int(det.matcher.k_image),
            "k_gallery": int(det.matcher.k_gallery),
            "threshold": det.threshold,
            "pixel_threshold": det.pixel_threshold,
        }
        return _Served(det.contract, det.runner.fingerprint, settings)


def write_repository(
    model: str | Path, gallery: str | Path, repository: str | Path, options: RepoOptions
) -> WrittenVersion:
    """Add one version (model + gallery) to ``repository``; create it when missing."""
    options.check()
    model, gallery, repo = Path(model), Path(gallery), Path(repository)
    for p in (model, gallery, *([options.engine] if options.engine else [])):
        if not p.is_file():
            raise InputError(f"{p}: no such file")
    if auto_backend(model) == "trt":
        raise InputError(
            f"{model}: give the ONNX model (CPU instances and the pairing check run it) and "
            "the engine built from it with --engine"
        )
    if options.kind == "cpu" and options.engine is not None:
        raise InputError("--engine is for --kind gpu (TensorRT instances)")
    served = _load_as_served(model, gallery, options)
    contract, fingerprint = served.contract, served.fingerprint
    if options.engine is not None:
        _check_engine(options.engine, fingerprint)
    cpu, gpu = _sides(model, options)
    if gpu["backend"] == "trt" and options.engine is None:
        raise InputError("--backend trt runs a TensorRT engine: give it with --engine")
    model_dir = repo / MODEL
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{repo}: cannot create the repository: {e.strerror or e}") from None
    have = versions(model_dir)
    v = options.version if options.version is not None else (have[-1] + 1 if have else 1)
    if (model_dir / str(v)).exists():
        raise InputError(f"{model_dir / str(v)}: version {v} exists; versions are immutable")
    manifest: dict[str, Any] = {
        "role": MODEL,
        "model": "model.onnx",
        "gallery": "gallery.bin",
        "cpu": cpu,
        "gpu": gpu,
        "fingerprint": fingerprint,
        "source_model": str(model.resolve()),
        "source_gallery": str(gallery.resolve()),
        "created_utc": utc_timestamp(),
        **served.settings,
    }
    files = {"model.onnx": model, "gallery.bin": gallery}
    if options.engine is not None:
        files["model.engine"] = options.engine
        manifest["gpu_model"] = "model.engine"
    _write_version(model_dir, v, manifest, files, options.bundle)
    write_atomic(model_dir / "config.pbtxt", spade_config(contract, options).encode())
    bb_v = _write_backbone(repo, model, contract, fingerprint, options, cpu, gpu)
    return WrittenVersion(repo, v, model_dir / str(v), bb_v)


def _write_backbone(
    repo: Path,
    model: Path,
    contract: Contract,
    fingerprint: str,
    o: RepoOptions,
    cpu: dict[str, str],
    gpu: dict[str, str],
) -> int | None:
    """A new backbone version only when the model changed (galleries do not concern it)."""
    if not o.backbone:
        return None
    bb_dir = repo / BACKBONE
    bb_dir.mkdir(parents=True, exist_ok=True)
    have = versions(bb_dir)
    config = backbone_config(contract, fingerprint, o).encode()
    if have:
        try:
            last = json.loads((bb_dir / str(have[-1]) / MANIFEST).read_text())
        except (OSError, ValueError):
            last = {}
        if last.get("fingerprint") == fingerprint:
            write_atomic(bb_dir / "config.pbtxt", config)
            return have[-1]
    v = have[-1] + 1 if have else 1
    manifest = {
        "role": BACKBONE,
        "model": "model.onnx",
        "cpu": {"backend": cpu["backend"]},
        "gpu": {"backend": gpu["backend"]},
        "fingerprint": fingerprint,
    }
    files = {"model.onnx": model}
    if o.engine is not None:
        files["model.engine"] = o.engine
        manifest["gpu_model"] = "model.engine"
    _write_version(bb_dir, v, manifest, files, o.bundle)
    write_atomic(bb_dir / "config.pbtxt", config)
    return v


def _write_version(
    model_dir: Path, v: int, manifest: dict[str, Any], files: dict[str, Path], bundle: bool
) -> Path:
    final = model_dir / str(v)
    tmp = model_dir / f".tmp-{v}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, src in files.items():
            _copy(src, tmp / name)
        shutil.copyfile(Path(__file__).with_name("model.py"), tmp / "model.py")
        if bundle:
            manifest["site"] = bundle_site(tmp / "site")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_engine(engine: Path, fingerprint: str) -> None:
    """The engine must come from this ONNX model or a precision derived from it (fp16/int8);
    whether the gallery may be reused with a derived engine is decided when the server loads
    it (runtime/compat.py)."""
    ef = read_engine_file(engine)
    if fingerprint not in (ef.fingerprint, ef.parent_fingerprint):
        raise CompatibilityError(
            f"{engine}: engine built from another model (fingerprint {ef.fingerprint[:12]}, "
            f"the ONNX model is {fingerprint[:12]})"
        )


__all__ = [
    "BACKBONE",
    "MODEL",
    "RepoOptions",
    "WrittenVersion",
    "backbone_config",
    "bundle_site",
    "spade_config",
    "versions",
    "write_repository",
]

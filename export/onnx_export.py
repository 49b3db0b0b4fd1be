"""Export a backbone to a self-describing fp32 ONNX file, with a parity check built in.

The graph takes ``image`` float32 [B,3,S,S] (dynamic B) and returns one channels-last
[B,H,W,C] map per pyramid level plus ``pooled`` [B,C]; the permute to channels-last happens in the
graph so every runtime gets contiguous per-position vectors for free. The preprocessing contract
and the graph fingerprint go into ``metadata_props``, so galleries and engines built from the file
can prove which model they belong to. The file is written to a temp name, checked against torch
in ONNX Runtime, and only then renamed into place: a failed export never leaves a model behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spade_edge.export.backbones import BackboneSpec, get_backbone
from spade_edge.export.weights import build_with_weights
from spade_edge.runtime.contract import (
    METADATA_CONTRACT_KEY,
    METADATA_FINGERPRINT_KEY,
    Contract,
    Level,
    resize_for,
)
from spade_edge.runtime.errors import ExportError, InputError
from spade_edge.runtime.fileio import atomic_path
from spade_edge.runtime.model_meta import graph_fingerprint

#: Largest accepted relative error (max|ort - torch| / max|torch|, per output) of the fp32 export.
TORCH_PARITY_RTOL = 1e-4
PARITY_BATCH = 2
DEFAULT_OPSET = 18


@dataclass
class ExportReport:
    """What ``export_onnx`` produced and how faithful it is."""

    path: Path
    fingerprint: str
    contract: Contract
    seconds: float  # torch.onnx.export + serialisation
    bytes: int
    max_abs: float | None = None  # over all outputs; None when check=False
    max_rel: float | None = None
    parity: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (abs, rel)
    parity_seconds: float | None = None
    opset: int | None = None


def strip_debug_info(model_proto: Any) -> None:
    """Drop exporter debug annotations (stack traces with source paths and line numbers, FX node
    dumps) so the file does not leak paths and the fingerprint depends only on the computation.
    """
    graph = model_proto.graph
    graph.doc_string = ""
    del graph.metadata_props[:]
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for group in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in group:
            del item.metadata_props[:]


def _feature_module(backbone_module: Any) -> Any:
    """Wrap a backbone so its outputs are the contract's tuple: NHWC levels, then pooled."""
    import torch

    class SpadeFeatures(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            levels, pooled = self.net(image)
            return (*[lv.permute(0, 2, 3, 1).contiguous() for lv in levels], pooled)

    return SpadeFeatures(backbone_module).train(False)  # inference mode (BN, dropout)


def check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise InputError(f"--image-size must be an integer, got {image_size!r}")
    if image_size < 32 or image_size > 2048 or image_size % 16:
        raise InputError(
            f"--image-size {image_size} is not supported: use a multiple of 16 "
            "between 32 and 2048 (so every level has an exact stride)"
        )


def build_feature_model(
    backbone: str | BackboneSpec,
    weights: str = "imagenet",
    seed: int = 0,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> tuple[Any, str]:
    """The torch module exactly as exported (NHWC levels + pooled) and its weights tag.

    Other tools use it as the torch reference for their own parity checks.
    """
    spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
    net, loaded = build_with_weights(spec, weights, cache_dir, progress, seed)
    return _feature_module(net), loaded.tag


def make_contract(
    spec: BackboneSpec,
    weights_tag: str,
    image_size: int,
    level_shapes: list[tuple[int, int, int]],
    extra: dict[str, Any] | None = None,
) -> Contract:
    """Contract from the registry row and the measured (H, W, C) of each level."""
    levels = []
    for name, stride, ch, (h, w, c) in zip(
        spec.level_names, spec.strides, spec.channels, level_shapes, strict=True
    ):
        if c != ch or h != image_size // stride or w != image_size // stride:
            raise ExportError(
                f"backbone {spec.name}: level {name} is {h}x{w}x{c}, registry says "
                f"{image_size // stride}x{image_size // stride}x{ch} (stride {stride})"
            )
        levels.append(Level(name=name, stride=stride, channels=c, height=h, width=w))
    return Contract(
        backbone=spec.name,
        weights=weights_tag,
        levels=tuple(levels),
        pooled_dim=spec.pooled_dim,
        image_size=image_size,
        resize=resize_for(image_size),
        mean=spec.mean,
        std=spec.std,
        extra=dict(extra or {}),
    )


def _torch_export(module: Any, example: Any, names: list[str], opset: int, dynamo: bool) -> Any:
    """torch.onnx.export to an in-memory ModelProto with a dynamic batch axis."""
    import onnx
    import torch

    kwargs: dict[str, Any] = {
        "input_names": ["image"],
        "output_names": names,
        "opset_version": opset,
    }
    quiet = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),
    ):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            prog = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
                **kwargs,
            )
            assert prog is not None
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(
            module,
            (example,),
            buf,  # type: ignore[arg-type]  # a file object works; torch annotates paths only
            dynamo=False,
            dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            do_constant_folding=True,
            **kwargs,
        )
        return onnx.load_from_string(buf.getvalue())


def _parity(path: Path, x: np.ndarray, ref: list[np.ndarray], names: list[str]) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = sess.run(names, {"image": x})
    result: dict[str, tuple[float, float]] = {}
    for name, a, b in zip(names, outs, ref, strict=True):
        if a.shape != b.shape:
            raise ExportError(f"{path}: output {name} has shape {a.shape}, torch gives {b.shape}")
        diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        scale = float(np.max(np.abs(b)))
        result[name] = (diff, diff / scale if scale > 0 else diff)
    return result


def export_onnx(
    backbone: str,
    out: str | Path,
    weights: str = "imagenet",
    image_size: int = 224,
    check: bool = True,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    seed: int = 0,
    progress: bool = True,
    cache_dir: Path | None = None,
    rtol: float = TORCH_PARITY_RTOL,
) -> ExportReport:
    """Export ``backbone`` to ``out`` (fp32 ONNX with contract + fingerprint metadata).

    With ``check`` the written graph is run in ONNX Runtime CPU against torch on a random batch
    of 2; a relative error above ``rtol`` on any output raises ExportError and writes nothing.
    """
    import torch

    spec = get_backbone(backbone)
    check_image_size(image_size)
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give the output a file name like model.onnx")
    # atomic_path fails on an unwritable destination before minutes of export work
    with atomic_path(out, ExportError, make_parents=True) as tmp:
        module, tag = build_feature_model(spec, weights, seed, progress, cache_dir)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((PARITY_BATCH, 3, image_size, image_size), dtype=np.float32)
        with torch.inference_mode():
            ref = [t.numpy().astype(np.float64) for t in module(torch.from_numpy(x))]
        for name, r in zip([*spec.level_names, "pooled"], ref, strict=True):
            if not np.all(np.isfinite(r)):
                raise ExportError(f"backbone {spec.name}: torch output {name} is not finite")
        names = [*spec.level_names, "pooled"]
        exporter = "torch.onnx dynamo" if dynamo else "torch.onnx"
        extra: dict[str, Any] = {"exporter": exporter, "torch": torch.__version__}
        if "level_blocks" in spec.kwargs:
            extra["level_blocks"] = list(spec.kwargs["level_blocks"])
        contract = make_contract(spec, tag, image_size, [r.shape[1:] for r in ref[:-1]], extra)

        t0 = time.perf_counter()
        try:
            model = _torch_export(module, torch.from_numpy(x), names, opset, dynamo)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{out}: torch.onnx.export failed for {spec.name}: {msg}") from None
        strip_debug_info(model)
        fingerprint = graph_fingerprint(model)
        del model.metadata_props[:]
        for k, v in (
            (METADATA_CONTRACT_KEY, contract.to_json()),
            (METADATA_FINGERPRINT_KEY, fingerprint),
        ):
            p = model.metadata_props.add()
            p.key, p.value = k, v
        model.producer_name = "spade-edge"
        data = model.SerializeToString()
        if len(data) >= 2**31 - 1:
            raise ExportError(f"{out}: model is over 2 GB, which a single-file ONNX cannot hold")
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise ExportError(f"{out}: cannot write the model ({e.strerror or e})") from None
        seconds = time.perf_counter() - t0
        opset_used = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None
        )
        del model, data

        report = ExportReport(
            path=out,
            fingerprint=fingerprint,
            contract=contract,
            seconds=seconds,
            bytes=tmp.stat().st_size,
            opset=opset_used,
        )
        if check:
            t1 = time.perf_counter()
            try:
                report.parity = _parity(tmp, x, ref, names)
            except ExportError:
                raise
            except Exception as e:
                msg = str(e).strip().splitlines()[0]
                raise ExportError(f"{out}: ONNX Runtime cannot run the export: {msg}") from None
            report.parity_seconds = time.perf_counter() - t1
            report.max_abs = max(a for a, _ in report.parity.values())
            report.max_rel = max(r for _, r in report.parity.values())
            worst = max(report.parity, key=lambda n: report.parity[n][1])
            if report.max_rel > rtol:
                raise ExportError(
                    f"{out}: parity check failed: output {worst} differs from torch by "
                    f"{report.max_rel:.2e} relative (limit {rtol:.0e}); nothing written"
                )
    return report

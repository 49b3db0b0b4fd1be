"""The Triton Python-backend model: copied as ``model.py`` into every version folder.

It runs inside Triton's Python stub (numpy 1.26 there; spade-edge supports it), one process per
model instance. Each instance holds a ``Detector`` over the model and gallery files of its own
version folder, as ``spade.json`` beside it describes (``spade_edge.triton.repository``):
TensorRT + CUDA matcher on ``KIND_GPU`` instances (on the instance's GPU), ONNX Runtime + NumPy
on ``KIND_CPU`` ones. A version folder that carries ``site/`` (the spade_edge code it was
written with) imports spade_edge from there, so the code and the gallery roll out together.

Two models use this file, told apart by ``spade.json``'s ``role``:
- ``spade``: ``IMAGE`` (encoded file bytes) -> ``SCORE``, ``ANOMALOUS`` (1/0/-1), ``ANOMALY_MAP``;
- ``spade_backbone``: the preprocessed batch -> the feature pyramid, for the ``triton`` runner.

A bad image fails its own request with a Triton error naming what is wrong; the other requests
of the batch are scored and the model keeps serving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if (_HERE / "site").is_dir() and str(_HERE / "site") not in sys.path:
    sys.path.insert(0, str(_HERE / "site"))

# below the site/ insert, so a bundled version's own spade_edge is the one imported
import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]  # noqa: E402

import spade_edge.runtime as rt  # noqa: E402
from spade_edge.runtime.detector import Detector  # noqa: E402
from spade_edge.runtime.errors import SpadeError  # noqa: E402
from spade_edge.runtime.preprocess import Geometry, Prepared, prepare_bytes  # noqa: E402
from spade_edge.runtime.runners import open_runner  # noqa: E402

MANIFEST = "spade.json"


def _error(message: str) -> Any:
    try:
        err = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # stubs older than the error codes
        err = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    """One instance: a Detector (role ``spade``) or a runner (role ``spade_backbone``)."""

    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((version_dir / MANIFEST).read_text())
        config = json.loads(args["model_config"])
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        self.role = manifest["role"]
        gpu = args.get("model_instance_kind") == "GPU"
        dev = int(args.get("model_instance_device_id") or 0)
        side = manifest["gpu" if gpu else "cpu"]
        runner_opts: dict[str, Any] = {"max_batch": self.max_batch}
        if side["backend"] in ("trt", "ort-gpu"):
            runner_opts["device"] = dev
        model_path = (
            version_dir / manifest["gpu_model" if gpu and "gpu_model" in manifest else "model"]
        )
        self.detector: Any = None
        self.runner: Any = None
        if self.role == "spade_backbone":
            self.runner = open_runner(model_path, side["backend"], **runner_opts)
            self.contract = self.runner.contract
        else:
            matcher_opts: dict[str, Any] = {"device": dev} if side["matcher"] == "cuda" else {}
            self.detector = Detector.load(
                model_path,
                version_dir / manifest["gallery"],
                backend=side["backend"],
                matcher=side["matcher"],
                k_image=manifest.get("k_image"),
                k_gallery=manifest.get("k_gallery"),
                runner_options=runner_opts,
                matcher_options=matcher_opts,
            )
            self.contract = self.detector.contract
            # warm-up: the version reports ready only once an inference has run
            s = self.contract.image_size
            self.detector.score_prepared([_blank(s)])
        self._counters = _counters(self.role, args["model_name"], args["model_version"])
        pb_utils.Logger.log_info(
            f"spade {self.role} v{args['model_version']}: {side['backend']} + "
            f"{side.get('matcher', '-')} on {'GPU ' + str(dev) if gpu else 'CPU'}; "
            f"spade_edge from {Path(rt.__file__).parent}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.role == "spade_backbone":
            return [self._features(r) for r in requests]
        return self._inspect(requests)

    # -- role spade_backbone ---------------------------------------------------------------
    def _features(self, request: Any) -> Any:
        x = pb_utils.get_input_tensor_by_name(request, self.contract.input_name).as_numpy()
        try:
            f = self.runner.infer(np.ascontiguousarray(x, dtype=np.float32)).to_host()
        except SpadeError as e:
            return _error(str(e))
        names = self.contract.output_names
        arrays = [*f.levels, f.pooled]
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(n, np.ascontiguousarray(a, dtype=np.float32))
                for n, a in zip(names, arrays, strict=True)
            ]
        )

    # -- role spade -------------------------------------------------------------------------
    def _inspect(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        todo: list[tuple[int, list[Any]]] = []
        for i, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            try:
                preps = []
                for j, data in enumerate(images):
                    raw = data if isinstance(data, bytes) else bytes(data)
                    preps.append(prepare_bytes(raw, self.contract, f"IMAGE[{j}]"))
            except SpadeError as e:
                responses[i] = _error(str(e))
                self._count("bad_image", 1)
                continue
            todo.append((i, preps))
        flat = [p for _, preps in todo for p in preps]
        results: list[Any] = []
        try:
            for s in range(0, len(flat), self.max_batch):
                results += self.detector.score_prepared(flat[s : s + self.max_batch])
        except SpadeError as e:
            for i, _ in todo:
                responses[i] = _error(str(e))
            return responses
        pos = 0
        for i, preps in todo:
            mine = results[pos : pos + len(preps)]
            pos += len(preps)
            score = np.array([[r.score] for r in mine], dtype=np.float32)
            verdict = np.array(
                [[-1 if r.is_anomalous is None else int(r.is_anomalous)] for r in mine],
                dtype=np.int8,
            )
            for v in verdict.reshape(-1):
                self._count(("unknown", "normal", "anomalous")[int(v) + 1], 1)
            amap = np.stack([r.anomaly_map for r in mine]).astype(np.float32, copy=False)
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("SCORE", score),
                    pb_utils.Tensor("ANOMALOUS", verdict),
                    pb_utils.Tensor("ANOMALY_MAP", np.ascontiguousarray(amap)),
                ]
            )
        return responses

    def _count(self, verdict: str, n: int) -> None:
        c = self._counters.get(verdict)
        if c is not None:
            c.increment(n)

    def finalize(self) -> None:
        for v in VERDICTS:  # Metric objects go before their family
            self._counters.pop(v, None)
        self._counters.clear()
        if self.detector is not None:
            self.detector.close()
        if self.runner is not None:
            self.runner.close()


VERDICTS = ("normal", "anomalous", "unknown", "bad_image")


def _counters(role: str, model: str, version: str) -> dict[str, Any]:
    """Custom counter ``spade_images_total{model,version,verdict}`` on Triton's /metrics
    (Triton's own request counters count a bad image's error response as a success)."""
    if role != "spade" or not hasattr(pb_utils, "MetricFamily"):
        return {}
    family = pb_utils.MetricFamily(
        name="spade_images_total",
        description="Images scored by spade-edge, by verdict (bad_image: could not be decoded)",
        kind=pb_utils.MetricFamily.COUNTER,
    )
    out: dict[str, Any] = {
        v: family.Metric(labels={"model": model, "version": version, "verdict": v})
        for v in VERDICTS
    }
    out["_family"] = family  # kept alive as long as its metrics, dropped after them
    return out


def _blank(size: int) -> Any:
    t = np.zeros((3, size, size), dtype=np.float32)
    return Prepared(t, Geometry(size, size, size, size, 0, 0, size), np.zeros((1, 1, 3)), "warm")

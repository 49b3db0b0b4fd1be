"""Against a REAL tritonserver (the one the nvidia-pytriton wheel bundles), on loopback.

.ci/run runs these in the numpy-1.26 venv (pytriton pins numpy<2; its stub misreads numpy 2
arrays); elsewhere they skip. Every server is stopped by its fixture, even when a test fails;
every request loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from serve_support import defect_array, make_gallery, normal_array, png_bytes

try:
    from spade_edge.triton.server import LocalTritonServer, find_tritonserver

    find_tritonserver()
    import tritonclient.grpc
    import tritonclient.http  # noqa: F401
except Exception as e:  # BackendUnavailableError, ImportError
    pytest.skip(f"no tritonserver/tritonclient here: {e}", allow_module_level=True)

from spade_edge.runtime.detector import Detector
from spade_edge.runtime.preprocess import prepare_bytes
from spade_edge.runtime.runners.triton import TritonInspector, TritonRequestError
from spade_edge.triton.repository import RepoOptions, write_repository
from spade_edge.triton.server import load_model

RTOL = 1e-6
#: bottle images scored in the parity test (bounded for CI time on 2 cores)
BOTTLE_IMAGES = int(os.environ.get("SPADE_TRITON_BOTTLE_IMAGES", "12"))


@dataclass
class Served:
    server: LocalTritonServer
    model: Path
    gallery: Path
    repo: Path
    work: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from tiny_model import make_tiny_model

    work = tmp_path_factory.mktemp("triton")
    model = make_tiny_model(work / "tiny.onnx", image_size=32)
    gallery = make_gallery(model, work / "g1")
    repo = work / "repo"
    write_repository(model, gallery, repo, RepoOptions(instances=2, max_batch_size=4))
    with LocalTritonServer(repo, models=("spade", "spade_backbone")) as srv:
        yield Served(srv, model, gallery, repo, work)


def _images() -> list[bytes]:
    return [png_bytes(normal_array(100 + i)) for i in range(5)] + [png_bytes(defect_array())]


def _local(
    model: Path, gallery: Path, images: list[bytes]
) -> list[tuple[float, bool | None, np.ndarray]]:
    with Detector.load(model, gallery, backend="ort") as det:
        out = []
        for i, b in enumerate(images):
            r = det.score_prepared([prepare_bytes(b, det.contract, f"img{i}")])[0]
            out.append((r.score, r.is_anomalous, r.anomaly_map))
        return out


def _assert_same(remote: list, local: list, exact: bool = True) -> float:
    """Verdicts equal; maps bitwise equal and scores equal to the local score in FP32 (SCORE's
    type; the Detector's score is a float64) when ``exact``, else both within RTOL.
    Returns the worst relative difference to the float64 score / the map."""
    worst = 0.0
    for rr, (score, verdict, amap) in zip(remote, local, strict=True):
        assert rr.anomalous == verdict
        if exact:
            assert rr.score == float(np.float32(score))
            assert np.array_equal(rr.anomaly_map, amap)
        np.testing.assert_allclose(rr.score, score, rtol=RTOL, atol=0)
        np.testing.assert_allclose(rr.anomaly_map, amap, rtol=RTOL, atol=0)
        worst = max(
            worst,
            abs(rr.score - score) / abs(score),
            float(np.max(np.abs(rr.anomaly_map - amap) / np.maximum(np.abs(amap), 1e-30))),
        )
    return worst


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_scores_and_maps_equal_the_local_detector(served: Served, protocol: str) -> None:
    images = _images()
    url = served.server.grpc_url if protocol == "grpc" else served.server.http_url
    with TritonInspector(url, protocol=protocol) as c:
        remote = [c.inspect([b])[0] for b in images]  # one request each: batches of one
        batched = c.inspect(images[:4])  # one request of 4
    local = _local(served.model, served.gallery, images)
    worst = _assert_same(remote, local)
    _assert_same(batched, local[:4], exact=False)  # ORT on a batch of 4 vs 4 batches of 1
    assert remote[-1].anomalous is True and remote[0].anomalous is False
    print(f"parity {protocol}: worst relative difference {worst:.3g}")


def test_bad_image_gets_an_error_response_and_the_model_keeps_serving(served: Served) -> None:
    good = png_bytes(normal_array(1))
    truncated = good[: len(good) // 2]
    with TritonInspector(served.server.grpc_url) as c:
        for bad, why in [
            (b"not an image at all", "not an image"),
            (truncated, r"IMAGE\[0\]: corrupt"),
        ]:
            with pytest.raises(TritonRequestError, match=why):
                c.inspect([bad])
        assert c.inspect([good])[0].score > 0
    # the raw KServe v2 answer over HTTP: a JSON error naming the problem
    body = json.dumps(
        {"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": ["garbage"]}]}
    ).encode()
    req = urllib.request.Request(
        f"http://{served.server.http_url}/v2/models/spade/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    assert ei.value.code == 400
    err = json.loads(ei.value.read())["error"]
    assert "IMAGE[0]" in err and "not an image" in err
    with TritonInspector(served.server.http_url, protocol="http") as c:
        assert c.inspect([good])[0].score > 0


def _metric(text: str, name: str, labels: dict[str, str]) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (all versions)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_the_requests(served: Served) -> None:
    def scrape() -> str:
        with urllib.request.urlopen(served.server.metrics_url, timeout=30) as r:
            return r.read().decode()

    before = scrape()
    n_ok, n_bad = 5, 2
    with TritonInspector(served.server.grpc_url) as c:
        for i in range(n_ok):
            c.inspect([png_bytes(normal_array(200 + i))])
        for _ in range(n_bad):
            with pytest.raises(TritonRequestError):
                c.inspect([b"junk"])
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return _metric(after, name, labels) - _metric(before, name, labels)

    # Triton's own counters: every request executed (an error response counts as executed)
    assert delta("nv_inference_request_success", model="spade") == n_ok + n_bad
    # the model's counters: verdicts and undecodable images
    assert delta("spade_images_total", model="spade", verdict="normal") == n_ok
    assert delta("spade_images_total", model="spade", verdict="bad_image") == n_bad


def test_triton_runner_and_spade_run_match_local(served: Served, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spade_edge.cli.run import app as run_app

    images = _images()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, b in enumerate(images):
        (folder / f"img{i}.png").write_bytes(b)
    with Detector.load(
        "spade_backbone",
        served.gallery,
        backend="triton",
        runner_options={"url": served.server.grpc_url},
    ) as det:
        assert (
            det.runner.fingerprint == Detector.load(served.model, served.gallery).runner.fingerprint
        )
        remote = [det.predict(folder / f"img{i}.png") for i in range(len(images))]
    local = _local(served.model, served.gallery, images)
    for r, (score, verdict, amap) in zip(remote, local, strict=True):
        # features cross the wire bitwise and the matcher runs here: identical results
        assert r.is_anomalous == verdict
        assert r.score == score and np.array_equal(r.anomaly_map, amap)

    def run(*extra: str) -> list[dict]:
        res = CliRunner().invoke(run_app, [*extra, str(served.gallery), str(folder)])
        assert res.exit_code == 0, res.output
        return [json.loads(x) for x in res.stdout.strip().splitlines()]

    here = run(str(served.model))
    for url in (served.server.grpc_url, f"http://{served.server.http_url}"):
        assert run("spade_backbone", "--triton", url) == here


def test_new_gallery_version_loads_while_requests_run(served: Served) -> None:
    """v2 (another gallery) loads under explicit model control; no request fails meanwhile."""
    g2 = make_gallery(served.model, served.work / "g2", n=11)
    probe = png_bytes(defect_array())
    want_v1 = _local(served.model, served.gallery, [probe])[0][0]
    want_v2 = _local(served.model, g2, [probe])[0][0]
    assert want_v1 != want_v2
    errors: list[str] = []
    scores: list[float] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        with TritonInspector(served.server.grpc_url) as c:
            deadline = time.monotonic() + 120
            for _ in range(2000):  # bounded in count and time
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    scores.append(c.inspect([probe])[0].score)
                except Exception as e:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        wv = write_repository(
            served.model, g2, served.repo, RepoOptions(instances=2, max_batch_size=4)
        )
        assert wv.version == 2
        n_before = len(scores)
        seconds = load_model(served.server.http_url, "spade")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert n_before > 0 and len(scores) > n_before
    seen = {round(s, 5) for s in scores}
    assert seen <= {round(want_v1, 5), round(want_v2, 5)}
    with TritonInspector(served.server.grpc_url) as c:
        assert c.inspect([probe])[0].score == pytest.approx(want_v2, rel=RTOL)
    with urllib.request.urlopen(
        f"http://{served.server.http_url}/v2/models/spade/versions/2/ready", timeout=10
    ) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(
            f"http://{served.server.http_url}/v2/models/spade/versions/1/ready", timeout=10
        )
    print(f"gallery v2 load: {seconds:.2f} s, {len(scores)} requests, 0 failed")
    # roll back: take v2 out of the repository and load again -> the newest left (v1) serves
    (served.repo / "spade" / "2").rename(served.work / "retired-2")
    back = load_model(served.server.http_url, "spade")
    with TritonInspector(served.server.grpc_url) as c:
        assert c.inspect([probe])[0].score == float(np.float32(want_v1))
    print(f"rollback to v1: {back:.2f} s")


@pytest.fixture(scope="module")
def lite0_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lite0 ONNX: SPADE_TEST_LITE0_ONNX (CI exports it in the main venv), else export here."""
    env = os.environ.get("SPADE_TEST_LITE0_ONNX")
    if env:
        return Path(env)
    pytest.importorskip("torch")
    from spade_edge.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("lite0") / "lite0.onnx"
    export_onnx("efficientnet_lite0", out, weights="imagenet")
    return out


def test_bottle_parity_lite0(bottle_dir: Path, lite0_model: Path, tmp_path: Path) -> None:
    from spade_edge.runtime.packer import pack

    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:40]
    tests = sorted((bottle_dir / "test").rglob("*.png"))
    step = max(1, len(tests) // BOTTLE_IMAGES)
    tests = tests[::step][:BOTTLE_IMAGES]
    g = tmp_path / "bottle.bin"
    pack(lite0_model, train, g, progress=False)
    repo = tmp_path / "repo"
    write_repository(lite0_model, g, repo, RepoOptions(backbone=False, k_image=5, k_gallery=5))
    images = [p.read_bytes() for p in tests]
    with LocalTritonServer(repo) as srv, TritonInspector(srv.grpc_url) as c:
        remote = [c.inspect([b])[0] for b in images]
    with Detector.load(lite0_model, g, backend="ort", k_image=5, k_gallery=5) as det:
        local = [(r.score, r.is_anomalous, r.anomaly_map) for r in (det.predict(p) for p in tests)]
    worst = _assert_same(remote, local)
    print(
        f"bottle parity: {len(tests)} images bitwise equal (score in FP32); float64 rel {worst:.3g}"
    )


def test_spade_serve_with_the_triton_backend(served: Served, tmp_path: Path) -> None:
    """spade-serve scores through the remote backbone: same numbers as a local Detector."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from spade_edge.serve import ServeConfig, create_app

    cfg = ServeConfig(
        model=Path(f"grpc://{served.server.grpc_url}/spade_backbone"),
        gallery=served.gallery,
        backend="triton",
        archive=tmp_path / "archive",
    )
    images = _images()[-2:]
    local = _local(served.model, served.gallery, images)
    with TestClient(create_app(cfg)) as c:
        for b, (score, verdict, _) in zip(images, local, strict=True):
            r = c.post("/v1/inspect", content=b, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            assert r.json()["anomalous"] == verdict
            # the API rounds to 6 decimals (Result.to_record): within half a unit of that
            assert r.json()["score"] == pytest.approx(score, abs=5e-7 + RTOL * score)

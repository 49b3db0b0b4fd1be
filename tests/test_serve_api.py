"""spade-serve API v1 through FastAPI's TestClient (tiny model: seconds, no real data)."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

with warnings.catch_warnings():  # starlette's note about httpx versions, at import time
    warnings.filterwarnings("ignore", message="Using `httpx`")
    from fastapi.testclient import TestClient
from PIL import Image
from serve_support import (
    defect_array,
    make_gallery,
    normal_array,
    png_bytes,
)

from spade_edge.runtime.detector import Detector
from spade_edge.serve import ServeConfig, create_app

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny_model import make_tiny_model

    d = tmp_path_factory.mktemp("serve_art")
    model = make_tiny_model(d / "tiny.onnx", image_size=32)
    return model, make_gallery(model, d)


def _config(artifacts: tuple[Path, Path], archive: Path, **kw: object) -> ServeConfig:
    model, gallery = artifacts
    opts: dict[str, object] = {"token": TOKEN, "archive": archive, "max_wait_ms": 2.0}
    opts.update(kw)
    return ServeConfig(model=model, gallery=gallery, **opts)  # type: ignore[arg-type]


@pytest.fixture()
def client(artifacts: tuple[Path, Path], tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(_config(artifacts, tmp_path / "archive"))
    with TestClient(app) as c:
        yield c


def _post(c: TestClient, data: bytes, **params: str) -> object:
    return c.post("/v1/inspect", content=data, params=params, headers={"content-type": "image/png"})


# ----------------------------------------------------------------------------------- inspect


def test_inspect_fields_archive_and_parity_with_detector(client, artifacts) -> None:
    model, gallery = artifacts
    good, bad = png_bytes(normal_array(50)), png_bytes(defect_array())
    r1 = _post(client, good, part_id="A-1", station="line3")
    r2 = _post(client, bad, part_id="A-2")
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    a, b = r1.json(), r2.json()
    keys = "id part_id score threshold anomalous map_max pixel_threshold defect_fraction regions"
    for key in [*keys.split(), "latency_ms", "model", "gallery_version"]:
        assert key in a
    assert set(a["latency_ms"]) == {"queue", "decode", "infer", "match", "total"}
    assert b["id"] > a["id"] >= 1
    assert a["part_id"] == "A-1" and a["station"] == "line3"
    assert a["anomalous"] is False and b["anomalous"] is True
    assert a["regions"] == [] and b["regions"], b
    reg = b["regions"][0]
    assert set(reg) == {"x", "y", "w", "h", "area", "peak"}
    # the red square is at x 8..30, y 10..30 of a 40x48 image: the largest region covers it
    assert reg["x"] <= 12 and reg["y"] <= 14 and reg["x"] + reg["w"] >= 26
    assert reg["peak"] >= b["pixel_threshold"]
    assert b["gallery_version"] == 1 and len(b["model"]) == 64
    # the same numbers as the library (what spade-run prints)
    with Detector.load(model, gallery) as det:
        for data, got in ((good, a), (bad, b)):
            rec = det.predict(Image.open(io.BytesIO(data))).to_record()
            for key in ("score", "threshold", "anomalous", "map_max", "defect_fraction"):
                assert got[key] == rec[key], key
    # GET returns exactly what POST answered
    assert client.get(f"/v1/results/{a['id']}").json() == a
    assert client.get(f"/v1/results/{b['id']}").json() == b


def test_formats_multipart_and_content_sniffing(client) -> None:
    arr = normal_array(7)
    for fmt, ctype in (
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ):
        r = client.post("/v1/inspect", content=png_bytes(arr, fmt), headers={"content-type": ctype})
        assert r.status_code == 200, (fmt, r.text)
    # the declared type is not trusted: a PNG declared as JPEG (or as text) is still a PNG
    r = client.post("/v1/inspect", content=png_bytes(arr), headers={"content-type": "text/plain"})
    assert r.status_code == 200
    img = client.get(f"/v1/results/{r.json()['id']}/image")
    assert img.headers["content-type"] == "image/png" and img.content == png_bytes(arr)
    r = client.post(
        "/v1/inspect",
        files={"image": ("part.png", png_bytes(arr), "application/octet-stream")},
        data={"part_id": "mp-1"},
    )
    assert r.status_code == 200 and r.json()["part_id"] == "mp-1"
    # a GIF decodes with Pillow but is not an accepted format
    r = client.post("/v1/inspect", content=png_bytes(arr, "GIF"))
    assert r.status_code == 400 and "PNG, JPEG, BMP, TIFF" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty request body"),
        (b"not an image at all", "not a PNG"),
        (png_bytes(normal_array(1))[:60], "corrupt or truncated"),
    ],
)
def test_bad_images_are_400_not_archived_and_server_keeps_serving(client, body, needle) -> None:
    before = client.get("/v1/results").json()["results"]
    r = client.post("/v1/inspect", content=body, headers={"content-type": "image/png"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    assert client.get("/v1/results").json()["results"] == before
    assert _post(client, png_bytes(normal_array(2))).status_code == 200


def test_bad_multipart_and_labels(client) -> None:
    r = client.post("/v1/inspect", files={"other": ("x.png", png_bytes(normal_array(1)))})
    assert r.status_code == 400 and "'image'" in r.json()["error"]
    r = client.post(
        "/v1/inspect",
        content=b"--xx\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=xx"},
    )
    assert r.status_code == 400
    r = _post(client, png_bytes(normal_array(1)), part_id="bad\x00id")
    assert r.status_code == 400 and "part_id" in r.json()["error"]
    r = client.get("/v1/results", params={"limit": 0})
    assert r.status_code == 400 and "error" in r.json()
    assert client.get("/v1/results/999999").status_code == 404
    assert client.get("/v1/results/abc").status_code == 400


def test_body_and_decompression_caps(artifacts, tmp_path: Path) -> None:
    app = create_app(_config(artifacts, tmp_path / "a", max_body_mb=0.05))  # ~52 KB
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    with TestClient(app) as c:
        r = _post(c, png_bytes(big))
        assert r.status_code == 413 and "limit" in r.json()["error"]
        # a 15 KB file that decodes to 120 Mpx (decompression bomb) is refused, not decoded
        buf = io.BytesIO()
        Image.new("1", (12000, 10000)).save(buf, "PNG")
        assert len(buf.getvalue()) < 20_000
        r = _post(c, buf.getvalue())
        assert r.status_code == 400 and "too large" in r.json()["error"], r.text
        assert c.get("/v1/results").json()["results"] == []
        assert _post(c, png_bytes(normal_array(3))).status_code == 200


def test_results_query_filters_and_overlay(client) -> None:
    ids = []
    for i in range(5):
        data = png_bytes(defect_array() if i % 2 else normal_array(10 + i))
        ids.append(_post(client, data, part_id=f"p{i}").json()["id"])
    all_ = client.get("/v1/results").json()["results"]
    assert [r["id"] for r in all_] == ids
    assert [
        r["id"] for r in client.get("/v1/results", params={"since_id": ids[1]}).json()["results"]
    ] == ids[2:]
    assert [
        r["id"] for r in client.get("/v1/results", params={"limit": 2}).json()["results"]
    ] == ids[3:]
    anom = client.get("/v1/results", params={"anomalous": "true"}).json()["results"]
    assert [r["id"] for r in anom] == ids[1::2]
    ov = client.get(f"/v1/results/{ids[1]}/overlay.png")
    assert ov.status_code == 200 and ov.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(ov.content))
    assert im.size == (40, 48)  # drawn on the original geometry
    assert client.get(f"/v1/results/{ids[1]}/overlay.png").content == ov.content  # cached


def test_strict_json_everywhere(client) -> None:
    _post(client, png_bytes(normal_array(4)))
    for path in ("/v1/results", "/v1/gallery", "/healthz", "/readyz", "/v1/results/1"):
        text = client.get(path).text
        json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert "openapi" in client.get("/openapi.json").json()


def test_health_ready_and_metrics(client) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["gallery_version"] == 1
    _post(client, png_bytes(normal_array(5)))
    _post(client, png_bytes(defect_array()))
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    for needle in (
        'spade_stage_seconds_bucket{le="0.001",stage="infer"}',
        'spade_stage_seconds_count{stage="decode"}',
        'spade_verdicts_total{verdict="anomalous"} 1.0',
        'spade_verdicts_total{verdict="normal"} 1.0',
        "spade_queue_depth 0.0",
        "spade_batch_size_bucket",
        "spade_gallery_version 1.0",
        "spade_gallery_images 12.0",
        'spade_recent_normal_score{quantile="0.5"}',
    ):
        assert needle in text, needle


def test_readyz_503_until_loaded(artifacts, tmp_path: Path, monkeypatch) -> None:
    from spade_edge.serve import service as service_mod

    gate = threading.Event()
    real_load = service_mod.InspectionService.load

    def slow_load(self: object) -> None:
        assert gate.wait(30)
        real_load(self)  # type: ignore[arg-type]

    monkeypatch.setattr(service_mod.InspectionService, "load", slow_load)
    app = create_app(_config(artifacts, tmp_path / "a"), load_in_background=True)
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] and "error" in r.json()
        r = _post(c, png_bytes(normal_array(1)))
        assert r.status_code == 503 and "loading" in r.json()["error"]
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _post(c, png_bytes(normal_array(1))).status_code == 200


# ----------------------------------------------------------------------------- concurrency


def _hold_worker(app: object) -> tuple[threading.Event, threading.Event]:
    """Make the next inference batch block until released (to fill the queue on purpose)."""
    svc = app.state.service  # type: ignore[attr-defined]
    det = svc.active.detector
    entered, release = threading.Event(), threading.Event()
    real = det.score_prepared

    def held(preps, timings=None):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(30)
        return real(preps, timings)

    det.score_prepared = held
    return entered, release


def test_full_queue_is_503_with_retry_after(artifacts, tmp_path: Path) -> None:
    app = create_app(_config(artifacts, tmp_path / "a", queue=3, max_batch=1))
    with TestClient(app) as c:
        entered, release = _hold_worker(app)
        data = png_bytes(normal_array(1))
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_post, c, data) for _ in range(3)]
            assert entered.wait(30)
            deadline = time.monotonic() + 30
            while app.state.service._inflight < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = _post(c, data)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "queue" in r.json()["error"]
            release.set()
            assert [f.result(timeout=60).status_code for f in futs] == [200, 200, 200]
        assert 'spade_requests_rejected_total{reason="overloaded"} 1.0' in c.get("/metrics").text


def test_request_timeout_is_504_and_not_archived(artifacts, tmp_path: Path) -> None:
    app = create_app(_config(artifacts, tmp_path / "a", timeout_s=0.3))
    with TestClient(app) as c:
        _, release = _hold_worker(app)
        r = _post(c, png_bytes(normal_array(1)))
        assert r.status_code == 504 and "0.3" in r.json()["error"]
        release.set()
        assert c.get("/v1/results").json()["results"] == []


def test_micro_batching_and_unique_ids_under_load(artifacts, tmp_path: Path) -> None:
    app = create_app(_config(artifacts, tmp_path / "a", max_batch=8, max_wait_ms=20))
    sizes: list[int] = []
    with TestClient(app) as c:
        svc = app.state.service
        svc._worker._on_batch = lambda n: sizes.append(n)
        data = [png_bytes(normal_array(i)) for i in range(6)]
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: _post(c, data[i % 6], part_id=f"q{i}"), range(40)))
        assert all(r.status_code == 200 for r in rs)
        ids = [r.json()["id"] for r in rs]
        assert len(set(ids)) == 40
        assert {r.json()["part_id"] for r in rs} == {f"q{i}" for i in range(40)}
        # each result is the one for its own image (batching never mixes up requests)
        by_img: dict[int, set[float]] = {}
        for i, r in enumerate(rs):
            by_img.setdefault(i % 6, set()).add(round(r.json()["score"], 4))
        assert all(len(s) == 1 for s in by_img.values()), by_img
    assert sum(sizes) == 40 and max(sizes) > 1, sizes


# --------------------------------------------------------------------------------- gallery


def test_gallery_add_by_ids_and_image_then_rollback(client) -> None:
    bad = _post(client, png_bytes(defect_array()), part_id="fa-1").json()
    assert bad["anomalous"] is True
    info = client.get("/v1/gallery").json()
    assert info["current"] == 1 and info["n_images"] == 12
    # no token / wrong token: refused, nothing changes
    assert client.post("/v1/gallery/normal", json={"ids": [bad["id"]]}).status_code == 401
    r = client.post(
        "/v1/gallery/normal", json={"ids": [bad["id"]]}, headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert client.get("/v1/gallery").json()["current"] == 1
    r = client.post("/v1/gallery/normal", json={"ids": [bad["id"]]}, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["version"] == 2 and out["n_images"] == 13 and out["added"] == [bad["id"]]
    assert out["thresholds"]["image"] == info["threshold"]  # kept without recalibrate
    assert (client.app.state.service.archive.folder / "gallery.v0002.bin").is_file()
    # the same part again scores lower now (it is in the gallery) and says version 2
    again = _post(client, png_bytes(defect_array())).json()
    # K=3: one of its three nearest normal images is now itself (distance 0)
    assert again["gallery_version"] == 2 and again["score"] < 0.8 * bad["score"]
    # the same content twice is refused (409), naming what it duplicates
    r = client.post("/v1/gallery/normal", json={"ids": [bad["id"]]}, headers=AUTH)
    assert r.status_code == 409 and "same content" in r.json()["error"]
    # an image body, with recalibration over the whole new gallery
    r = client.post(
        "/v1/gallery/normal",
        content=png_bytes(normal_array(77)),
        params={"recalibrate": "true"},
        headers={**AUTH, "content-type": "image/png"},
    )
    assert r.status_code == 200, r.text
    v3 = r.json()
    assert v3["version"] == 3 and v3["recalibrated"] and v3["thresholds"]["n_normal"] == 14
    g = client.get("/v1/gallery").json()
    assert [v["version"] for v in g["versions"]] == [1, 2, 3] and g["current"] == 3
    assert g["threshold"] == v3["thresholds"]["image"]
    # rollback to 1: the defect is anomalous again
    r = client.post("/v1/gallery/rollback", json={"version": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 1
    back = _post(client, png_bytes(defect_array())).json()
    assert back["gallery_version"] == 1 and back["anomalous"] is True
    assert client.post("/v1/gallery/rollback", json={"version": 9}, headers=AUTH).status_code == 404
    for body in ({"version": "1"}, {"version": 0}, [], {"v": 1}):
        r = client.post("/v1/gallery/rollback", json=body, headers=AUTH)
        assert r.status_code == 400, body
    assert "spade_gallery_version 1.0" in client.get("/metrics").text


def test_gallery_bad_requests(client, artifacts, tmp_path: Path) -> None:
    for body in ({"ids": []}, {"ids": ["1"]}, {"ids": [True]}, {"ids": [1], "x": 1}, [1]):
        r = client.post("/v1/gallery/normal", json=body, headers=AUTH)
        assert r.status_code == 400, body
    r = client.post(
        "/v1/gallery/normal",
        content=b"{bad json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 400
    assert (
        client.post("/v1/gallery/normal", json={"ids": [424242]}, headers=AUTH).status_code == 404
    )
    r = client.post(
        "/v1/gallery/normal", content=b"junk", headers={**AUTH, "content-type": "image/png"}
    )
    assert r.status_code == 400 and client.get("/v1/gallery").json()["current"] == 1
    # a server without a token file refuses every gallery change
    app = create_app(_config(artifacts, tmp_path / "b", token=None))
    with TestClient(app) as c:
        r = c.post("/v1/gallery/rollback", json={"version": 1}, headers=AUTH)
        assert r.status_code == 401 and "--token-file" in r.json()["error"]


def test_gallery_swap_under_concurrent_load_drops_nothing(artifacts, tmp_path: Path) -> None:
    app = create_app(_config(artifacts, tmp_path / "a", max_batch=4))
    with TestClient(app) as c:
        seed = _post(c, png_bytes(defect_array()), part_id="seed").json()
        stop = threading.Event()
        codes: list[tuple[int, int | None]] = []

        def client_loop(k: int) -> None:
            for i in range(200):  # bounded in count and time
                if stop.is_set():
                    return
                r = _post(c, png_bytes(normal_array(k * 1000 + i % 5)), part_id=f"c{k}-{i}")
                codes.append((r.status_code, r.json().get("gallery_version")))

        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(client_loop, k) for k in range(4)]
            time.sleep(0.3)
            r = c.post("/v1/gallery/normal", json={"ids": [seed["id"]]}, headers=AUTH)
            time.sleep(0.3)
            stop.set()
            for f in futs:
                f.result(timeout=120)
        assert r.status_code == 200 and r.json()["version"] == 2
        assert codes and all(code == 200 for code, _ in codes), codes[:5]
        versions = [v for _, v in codes]
        assert 1 in versions and 2 in versions
        ids = [x["id"] for x in c.get("/v1/results", params={"limit": 1000}).json()["results"]]
        assert len(ids) == len(codes) + 1 == len(set(ids))


def test_listeners_archive_lookup_and_restart_keeps_state(artifacts, tmp_path: Path) -> None:
    archive = tmp_path / "a"
    app = create_app(_config(artifacts, archive))
    seen: list[dict] = []
    with TestClient(app) as c:
        svc = app.state.service
        unsub = svc.add_listener(seen.append)
        svc.add_listener(lambda r: 1 / 0)  # a failing listener never breaks a request
        first = _post(c, png_bytes(defect_array()), part_id="x").json()
        unsub()
        _post(c, png_bytes(normal_array(1)))
        assert seen == [first]
        c.post("/v1/gallery/normal", json={"ids": [first["id"]]}, headers=AUTH)
    # restarted on the same archive: same gallery version, ids keep increasing
    app = create_app(_config(artifacts, archive))
    with TestClient(app) as c:
        assert c.get("/v1/gallery").json()["current"] == 2
        nxt = _post(c, png_bytes(normal_array(2))).json()
        assert nxt["id"] == first["id"] + 2 and nxt["gallery_version"] == 2
        svc = app.state.service
        assert svc.archive.find_by_source_file("nope.png") is None
    with sqlite3.connect(archive / "archive.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_service_inspect_source_file_and_typed_errors(artifacts, tmp_path: Path) -> None:
    import asyncio

    from spade_edge.runtime.errors import InputError
    from spade_edge.serve import InspectionService

    svc = InspectionService(_config(artifacts, tmp_path / "a").validate())
    svc.load()
    try:

        async def go() -> dict:
            with pytest.raises(InputError, match=r"cam/p1\.png"):
                await svc.inspect(b"junk", source="watch", source_file="cam/p1.png")
            return await svc.inspect(
                png_bytes(normal_array(3)), part_id="p1", source="watch", source_file="cam/p1.png"
            )

        res = asyncio.run(go())
        assert res["source"] == "watch" and res["source_file"] == "cam/p1.png"
        assert svc.archive.find_by_source_file("cam/p1.png") == res
        assert svc.archive.query(anomalous=False) == [res]
    finally:
        svc.stop()


# ------------------------------------------------------------------------------- retention


def test_retention_keep_images_and_budget(artifacts, tmp_path: Path) -> None:
    app = create_app(_config(artifacts, tmp_path / "n", keep_images="anomalous"))
    with TestClient(app) as c:
        good = _post(c, png_bytes(normal_array(1))).json()
        bad = _post(c, png_bytes(defect_array())).json()
        assert good["image_kept"] is False and bad["image_kept"] is True
        assert c.get(f"/v1/results/{good['id']}/image").status_code == 404
        r = c.post("/v1/gallery/normal", json={"ids": [good["id"]]}, headers=AUTH)
        assert r.status_code == 404 and "not kept" in r.json()["error"]
    # budget of ~3 images: the oldest normal images lose their files first, rows stay
    one = len(png_bytes(normal_array(1)))
    budget_mb = 3.5 * (one + 4500) / 2**20
    app = create_app(_config(artifacts, tmp_path / "b", image_budget_mb=budget_mb))
    with TestClient(app) as c:
        bad = _post(c, png_bytes(defect_array())).json()
        goods = [_post(c, png_bytes(normal_array(i))).json() for i in range(6)]
        rows = {r["id"]: r for r in c.get("/v1/results").json()["results"]}
        assert len(rows) == 7
        assert rows[bad["id"]]["image_kept"] is True  # anomalous kept longest
        kept = [g["id"] for g in goods if rows[g["id"]]["image_kept"]]
        assert kept and kept == [g["id"] for g in goods][-len(kept) :]  # newest survive
        assert app.state.service.archive.file_bytes <= budget_mb * 2**20


def test_export_results_csv(artifacts, tmp_path: Path) -> None:
    import csv

    from spade_edge.serve.archive import export_csv

    app = create_app(_config(artifacts, tmp_path / "a"))
    with TestClient(app) as c:
        ids = [
            _post(c, png_bytes(normal_array(i)), part_id=f"p,{i}").json()["id"] for i in range(3)
        ]
        n = export_csv(tmp_path / "a", tmp_path / "out.csv")  # beside the live server
    assert n == 3
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [int(r["id"]) for r in rows] == ids and rows[1]["part_id"] == "p,1"
    assert export_csv(tmp_path / "a", tmp_path / "o2.csv", since_id=ids[1]) == 1
    from spade_edge.runtime.errors import InputError

    with pytest.raises(InputError, match="no spade-serve archive"):
        export_csv(tmp_path / "nothing", tmp_path / "o3.csv")


def test_config_validation() -> None:
    from spade_edge.runtime.errors import ConfigError

    base = {"model": Path("m"), "gallery": Path("g")}
    for kw, needle in (
        ({"host": "0.0.0.0"}, "--token-file"),
        ({"max_batch": 0}, "--max-batch"),
        ({"queue": -1}, "--queue"),
        ({"timeout_s": float("nan")}, "--timeout-s"),
        ({"keep_images": "some"}, "--keep-images"),
        ({"port": 70000}, "--port"),
    ):
        with pytest.raises(ConfigError, match=needle):
            ServeConfig(**base, **kw).validate()  # type: ignore[arg-type]
    ServeConfig(**base, host="0.0.0.0", insecure=True).validate()  # type: ignore[arg-type]
    ServeConfig(**base, host="::1").validate()  # type: ignore[arg-type]

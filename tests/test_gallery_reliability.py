"""Issue 11, gallery side: no laundering, atomic packs with thresholds, honest thresholds after
--add-to, non-finite values caught, stale temp files cleaned, small galleries usable, non-UTF-8
names, one bad image named (and skippable). Each test is the regression test of one defect."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_edge.runtime.container import read_container, write_container
from spade_edge.runtime.errors import FormatError, InputError
from spade_edge.runtime.fileio import stale_temp_files
from spade_edge.runtime.gallery import Gallery, append_gallery, rewrite_gallery
from spade_edge.runtime.packer import pack
from spade_edge.runtime.thresholds import calibrate_gallery

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.integers(0, 256, size=(36 + i % 5, 40, 3), dtype=np.uint8)
        p = folder / f"{seed}_{i:03d}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


@pytest.fixture
def calibrated(tiny_onnx: Path, tmp_path: Path) -> Path:
    """A 12-image gallery with thresholds (K=3 so leave-one-out has room)."""
    g = tmp_path / "base.bin"
    rep = pack(tiny_onnx, _images(tmp_path / "train", 12), g, progress=False, default_k=3)
    assert rep.thresholds is not None and rep.thresholds["n_normal"] == 12
    return g


def _flip_level_byte(path: Path) -> None:
    with Gallery.open(path) as g:
        bi = g.blob_info["level0"]
    data = bytearray(path.read_bytes())
    data[bi.offset + bi.nbytes // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------- defect 4: laundering


def test_add_to_a_corrupt_gallery_is_refused(
    tiny_onnx: Path, calibrated: Path, tmp_path: Path
) -> None:
    _flip_level_byte(calibrated)
    out = tmp_path / "new.bin"
    more = _images(tmp_path / "more", 2, seed=5)
    with pytest.raises(FormatError, match=r"level0.* is corrupt"):
        pack(tiny_onnx, more, out, progress=False, base_gallery=calibrated)
    assert not out.exists()


def test_recalibrating_a_corrupt_gallery_is_refused(calibrated: Path, tmp_path: Path) -> None:
    _flip_level_byte(calibrated)
    out = tmp_path / "new.bin"
    with pytest.raises(FormatError, match="corrupt"):
        calibrate_gallery(calibrated, out)
    assert not out.exists()


def test_every_blob_copy_verifies_first(calibrated: Path, tmp_path: Path) -> None:
    """Siblings: the library's copy paths themselves, not only the commands."""
    _flip_level_byte(calibrated)
    with Gallery.open(calibrated) as g:
        assert not g.verified
        with pytest.raises(FormatError, match="corrupt"):
            rewrite_gallery(g, tmp_path / "a.bin", thresholds=None)
        with pytest.raises(FormatError, match="corrupt"):
            append_gallery(g, tmp_path / "b.bin", g.pooled[:1], [lv[:1] for lv in g.levels], [])
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "b.bin").exists()


# ------------------------------------------------------------ defect 6: atomic pack + thresholds


def test_failed_thresholds_leave_the_old_gallery(
    tiny_onnx: Path, calibrated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spade_edge.runtime.packer as packer

    before = calibrated.read_bytes()

    def interrupted(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # Ctrl-C (or a kill) during the leave-one-out

    monkeypatch.setattr(packer, "compute_thresholds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(tiny_onnx, _images(tmp_path / "t2", 12, seed=2), calibrated, progress=False)
    assert calibrated.read_bytes() == before
    assert _temp_files(calibrated.parent) == []


def test_disk_full_while_writing_leaves_the_old_gallery(
    tiny_onnx: Path, calibrated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spade_edge.runtime.container as container

    before = calibrated.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(container.os, "fsync", full)
    with pytest.raises(InputError, match="No space left") as e:
        pack(tiny_onnx, _images(tmp_path / "t2", 12, seed=2), calibrated, progress=False)
    assert e.value.exit_code == 2  # README: 2 = input/output problem the user can fix
    assert calibrated.read_bytes() == before
    assert _temp_files(calibrated.parent) == []


def test_pack_killed_during_thresholds_leaves_the_old_gallery(
    tiny_onnx: Path, calibrated: Path, tmp_path: Path
) -> None:
    """kill -9 while thresholds are computed: the file on disk is still the old, calibrated one."""
    before = calibrated.read_bytes()
    marker = tmp_path / "thresholds-started"
    train = tmp_path / "t2"
    _images(train, 12, seed=2)
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import spade_edge.runtime.packer as packer
        def slow(*a, **k):
            Path({str(marker)!r}).write_text("x")
            time.sleep(60)
        packer.compute_thresholds = slow
        packer.pack({str(tiny_onnx)!r}, [{str(train)!r}], {str(calibrated)!r}, progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the pack never reached the thresholds"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert calibrated.read_bytes() == before
    with Gallery.open(calibrated, verify=True) as g:
        assert g.thresholds is not None and g.n_images == 12


# ------------------------------------------------------------------ defect 7: --add-to thresholds


def test_add_to_recomputes_thresholds_on_the_union(
    tiny_onnx: Path, calibrated: Path, tmp_path: Path
) -> None:
    with Gallery.open(calibrated) as g:
        old = g.thresholds
    assert old is not None
    out = tmp_path / "more.bin"
    rep = pack(
        tiny_onnx, _images(tmp_path / "m", 3, seed=7), out, progress=False, base_gallery=calibrated
    )
    with Gallery.open(out, verify=True) as g:
        assert g.n_images == 15
        th = g.thresholds
    assert th is not None and th == rep.thresholds
    assert th["n_normal"] == 15 and th["k_image"] == old["k_image"] == 3
    assert th["far"] == old["far"]  # the base's calibration settings are kept


def test_add_to_without_thresholds_drops_the_base_ones(
    tiny_onnx: Path, calibrated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "more.bin"
    more = _images(tmp_path / "m", 3, seed=7)
    rep = pack(tiny_onnx, more, out, progress=False, base_gallery=calibrated, far=0)
    assert rep.thresholds is None and "dropped" in (rep.thresholds_note or "")
    with Gallery.open(out) as g:
        assert g.thresholds is None


def test_detector_warns_when_thresholds_describe_another_gallery(
    tiny_onnx: Path, calibrated: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from spade_edge.runtime.detector import Detector

    stale = tmp_path / "stale.bin"
    with Gallery.open(calibrated) as g:
        th = g.thresholds
        append_gallery(
            g,
            stale,
            g.pooled[:1] + 1,
            [lv[:1] + 1 for lv in g.levels],
            [{"name": "x.png", "sha256": "ab" * 32}],
        )
    with Gallery.open(stale) as g:
        rewrite_gallery(g, stale, thresholds=th)  # what an old --add-to did
    with caplog.at_level("WARNING"), Detector.load(tiny_onnx, stale) as det:
        assert det.thresholds_warning is not None
        assert "12 normal images" in det.thresholds_warning and "13" in det.thresholds_warning
    assert "calibrated on 12" in caplog.text
    with Detector.load(tiny_onnx, calibrated) as det:
        assert det.thresholds_warning is None and det.threshold is not None


# ---------------------------------------------------------------- defect 9: non-finite values


def _with_blob_value(src: Path, dst: Path, blob: str, value: float) -> None:
    """A copy of ``src`` with one value of ``blob`` replaced and VALID checksums (crafted)."""
    c = read_container(src, b"SPADEGAL", {1})
    try:
        blobs = {name: np.array(c.blob(name)) for name in c.blob_info}
        manifest = c.manifest
    finally:
        c.close()
    blobs[blob].reshape(-1)[7] = value
    write_container(dst, b"SPADEGAL", 1, manifest, blobs)


@pytest.mark.parametrize(
    ("blob", "value"),
    [("level1", np.nan), ("level0", np.inf), ("pooled", -np.inf), ("level2_sqnorms", np.nan)],
)
def test_verify_catches_non_finite_values(
    calibrated: Path, tmp_path: Path, blob: str, value: float
) -> None:
    bad = tmp_path / "crafted.bin"
    _with_blob_value(calibrated, bad, blob, value)
    with Gallery.open(bad) as g:  # header-only open cannot know
        assert g.n_images == 12
    with pytest.raises(FormatError, match=rf"\['{blob}'\] hold NaN/inf"):
        Gallery.open(bad, verify=True)


def test_detector_verifies_by_default(tiny_onnx: Path, calibrated: Path, tmp_path: Path) -> None:
    """The default path to a result (Detector.load, spade-run, spade-serve) verifies."""
    from spade_edge.runtime.detector import Detector

    bad = tmp_path / "crafted.bin"
    _with_blob_value(calibrated, bad, "level1", np.nan)
    with pytest.raises(FormatError, match="NaN/inf"):
        Detector.load(tiny_onnx, bad)
    with Detector.load(tiny_onnx, bad, verify=False) as det:  # explicit opt-out
        assert det.gallery.n_images == 12


# ------------------------------------------------------------------ defect 13: stale temp files


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_write_removes_stale_temp_files_of_that_target_only(
    calibrated: Path, tmp_path: Path
) -> None:
    folder = calibrated.parent
    name = calibrated.name
    dead = _dead_pid()
    old = time.time() - 2 * 3600
    files = {
        f".{name}.{dead}.abcd1234.tmp": True,  # writer gone
        f".{name}.zyxw9876.tmp": False,  # pre-PID naming, fresh: maybe someone is writing
        f".{name}.qwer5678.tmp": True,  # pre-PID naming, 2 h old
        f".{name}.{os.getppid()}.abcd1234.tmp": False,  # writer alive, fresh
        f".other.bin.{dead}.abcd1234.tmp": False,  # another target
        f".{name}.{dead}.abcd1234.tmp.bak": False,  # not our pattern
        f"{name}.{dead}.abcd1234.tmp": False,  # not our pattern (no dot)
    }
    for f in files:
        (folder / f).write_bytes(b"partial")
    os.utime(folder / f".{name}.qwer5678.tmp", (old, old))
    assert sorted(p.name for p in stale_temp_files(calibrated)) == sorted(
        f for f, stale in files.items() if stale
    )
    with Gallery.open(calibrated) as g:
        rewrite_gallery(g, calibrated, extra={"x": 1})
    left = {p.name for p in folder.iterdir()}
    for f, stale in files.items():
        assert (f in left) is not stale, f


def test_kill_9_during_a_write_is_cleaned_by_the_next_write(calibrated: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys, time
        import spade_edge.runtime.container as container
        def stuck(fd):
            print("writing", flush=True)
            time.sleep(60)
        container.os.fsync = stuck
        from spade_edge.runtime.gallery import Gallery, rewrite_gallery
        with Gallery.open({str(calibrated)!r}) as g:
            rewrite_gallery(g, {str(calibrated)!r}, extra={{"y": 1}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    left = _temp_files(calibrated.parent)
    assert len(left) == 1 and f".{proc.pid}." in left[0]  # what kill -9 leaves
    with Gallery.open(calibrated, verify=True) as g:  # the old file is intact
        rewrite_gallery(g, calibrated, extra={"z": 1})
    assert _temp_files(calibrated.parent) == []


# -------------------------------------------------------------- defect 14: small galleries


def test_small_gallery_defaults_are_usable(tiny_onnx: Path, tmp_path: Path) -> None:
    from spade_edge.runtime.detector import Detector

    g = tmp_path / "three.bin"
    paths = _images(tmp_path / "three", 3)
    rep = pack(tiny_onnx, paths, g, progress=False)
    assert "need >= 10" in (rep.thresholds_note or "")
    with Gallery.open(g) as gal:
        assert gal.default_k == 3
    with Detector.load(tiny_onnx, g) as det:
        res = det.predict(paths[0])
        assert np.isfinite(res.score) and len(res.neighbors) == 3  # K = all 3 images
    # growing it with --add-to lets the default grow back to 5
    g2 = tmp_path / "more.bin"
    pack(tiny_onnx, _images(tmp_path / "m", 4, seed=3), g2, progress=False, base_gallery=g)
    with Gallery.open(g2) as gal:
        assert gal.n_images == 7 and gal.default_k == 5


# ------------------------------------------------------------- defect 10: non-UTF-8 file names


def test_non_utf8_names_are_stored_losslessly(tiny_onnx: Path, tmp_path: Path) -> None:
    folder = tmp_path / "latin1"
    paths = _images(folder, 3)
    raw = os.fsencode(folder) + b"/caf\xe9-\xff.png"
    os.rename(paths[1], raw)
    g = tmp_path / "g.bin"
    pack(tiny_onnx, [folder], g, progress=False)
    with Gallery.open(g, verify=True) as gal:
        names = [s["name"] for s in gal.sources]
        assert os.fsdecode(raw) in names
        assert raw in [os.fsencode(n) for n in names]  # the exact bytes come back
        stored = bytes(gal._c.blob("source_names"))
    assert b"caf\xe9-\xff.png" in stored


def test_cli_pack_prints_non_utf8_names(tiny_onnx: Path, tmp_path: Path) -> None:
    folder = tmp_path / "latin1"
    paths = _images(folder, 3)
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    os.rename(paths[1], raw)
    (folder / "broken.png").write_bytes(b"not a png")
    os.rename(folder / "broken.png", os.fsencode(folder) + b"/bad\xe9.png")
    out = tmp_path / "g\xe9.bin"
    exe = Path(sys.executable).with_name("spade-pack")
    r = subprocess.run(
        [str(exe), str(tiny_onnx), str(folder), "-o", str(out), "--skip-bad", "--no-progress"],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in r.stderr
    assert b"bad\\xe9.png" in r.stderr  # the skipped one, named readably
    assert b"images in gallery" in r.stdout


# ------------------------------------------------------- defect 3: one non-finite image


def test_nan_image_is_named_and_skippable(tiny_onnx: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _images(folder, 4)
    Image.fromarray(np.full((40, 40), np.nan, np.float32), mode="F").save(folder / "nan.tiff")
    out = tmp_path / "g.bin"
    with pytest.raises(InputError, match=r"nan\.tiff") as e:
        pack(tiny_onnx, [folder], out, progress=False)
    assert str(out) not in str(e.value)  # the image is at fault, not the gallery
    assert not out.exists()
    rep = pack(tiny_onnx, [folder], out, progress=False, skip_bad=True)
    assert rep.n_images == 4 and [Path(n).name for n, _ in rep.skipped_bad] == ["nan.tiff"]
    with Gallery.open(out, verify=True) as g:
        assert all(not s["name"].endswith("nan.tiff") for s in g.sources)

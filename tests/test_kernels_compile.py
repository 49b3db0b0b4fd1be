"""Every shipped CUDA kernel builds for Jetson Orin (sm_87), Ada (sm_89) and Hopper (sm_90).

CI has nvcc but no GPU, so this is where a kernel that does not build fails. The ptxas summary
(registers, shared memory, spills per entry point) is printed (``pytest -s`` or ``-rA``), and the
entry points the matcher looks up by name must exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spade_edge.runtime.matchers import cuda as cm

ARCHS = ("sm_87", "sm_89", "sm_90")
#: entry points CudaMatcher fetches with get_function (plus one per fused-kernel variant)
ENTRIES = {
    "knn_level.cu": {"prep_query"} | {f"knn_min_bm{bm}" for bm in cm.BM_CHOICES},
    "pooled_topk.cu": {"pooled_dist", "topk_select"},
    "postprocess.cu": {"upsample_mean", "blur_pass"},
}


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (
        "/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").is_file() else None
    )


def _compile(nvcc: str, src: Path, arch: str, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [nvcc, "-cubin", f"-arch={arch}", *cm.kernel_options(), "-Xptxas", "-v", "-o", str(out)]
    return subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=600)


def _summary(ptxas: str) -> dict[str, str]:
    """entry -> 'R regs, S B smem, stack F B, spills W/L' from ptxas -v output."""
    rows: dict[str, str] = {}
    entry = None
    stack = ""
    for line in ptxas.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", line)
        if m and entry:
            stack = f"stack {m.group(1)} B, spills {m.group(2)}/{m.group(3)} B"
            continue
        m = re.search(r"Used (\d+) registers(.*)", line)
        if m and entry:
            smem = re.search(r"(\d+) bytes smem", m.group(2))
            rows[entry] = f"{m.group(1)} regs, {smem.group(1) if smem else 0} B smem, {stack}"
            entry = None
    return rows


def test_every_kernel_builds_for_every_target(tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    sources = sorted(cm.KERNEL_DIR.glob("*.cu"))
    assert {s.name for s in sources} == set(cm.KERNEL_FILES) == set(ENTRIES)
    jobs = [(s, a) for s in sources for a in ARCHS]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 2)) as ex:
        results = list(
            ex.map(
                lambda j: _compile(nvcc, j[0], j[1], tmp_path / f"{j[0].stem}_{j[1]}.cubin"), jobs
            )
        )
    failures = []
    for (src, arch), r in zip(jobs, results, strict=True):
        if r.returncode != 0:
            failures.append(f"{src.name} {arch}:\n{r.stderr.strip()}")
            continue
        rows = _summary(r.stderr + r.stdout)
        print(f"\n{src.name} [{arch}]")
        for entry, text in sorted(rows.items()):
            print(f"  {entry:16s} {text}")
        missing = ENTRIES[src.name] - set(rows)
        if missing:
            failures.append(f"{src.name} {arch}: entry points missing: {sorted(missing)}")
        spilling = [e for e, t in rows.items() if e.startswith("knn_min") and "spills 0/0" not in t]
        if spilling:
            failures.append(f"{src.name} {arch}: fused kernels spill registers: {spilling}")
    assert not failures, "\n".join(failures)


def test_tile_constants_come_only_from_the_host_code() -> None:
    """knn_level.cu defines no tile constant itself (it refuses to build without the -D flags
    CudaMatcher and the SIMT emulator pass), so planner and kernel cannot drift apart."""
    src = (cm.KERNEL_DIR / "knn_level.cu").read_text()
    for name in cm.TILE_DEFINES:
        assert f"#define {name}" not in src, name
        assert f"-D{name}={cm.TILE_DEFINES[name]}" in cm.kernel_options()
    assert cm.TILE_DEFINES == {
        "KNN_BN": cm.BN,
        "KNN_BK": cm.BK,
        "KNN_STAGES": cm.STAGES,
        "KNN_THREADS": cm.THREADS,
    }
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-E", "-arch=sm_87", *cm.NVCC_OPTIONS, str(cm.KERNEL_DIR / "knn_level.cu")]
    bare = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "compile with -DKNN_BN" in bare.stderr
    cmd[3:3] = [o for o in cm.kernel_options() if o.startswith("-D")]
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

"""Snapshot the Python API of the real TensorRT bindings, without TensorRT or a GPU.

Why: spade-edge's TensorRT code cannot run here (no libnvinfer, no GPU), so a misspelt method
or an API removed in TensorRT 11 would only show up on the factory machine. The bindings
wheels (``tensorrt-cu12-bindings`` 10.x, ``tensorrt-cu13-bindings`` 11.x, ~1 MB each) hold the
real pybind11 module ``tensorrt_bindings/tensorrt.so``; it links only nine C entry points of
libnvinfer / libnvonnxparser / libnvinfer_plugin (``create*_INTERNAL``, ``getPluginRegistry``,
...). This tool compiles stub libraries that export those symbols (returning NULL), imports the
real module against them in a subprocess and records every class, member, enum value and the
pybind11 signature lines of the classes spade-edge uses. Nothing is *called*: a stub
``createInferBuilder_INTERNAL`` returns NULL, so this checks names and signatures only.

Usage (network for ``pip download`` the first time; wheels are cached in build/trt_api/)::

    python -m spade_edge_testing.trt_snapshot            # rewrite trt_snapshots/trt-*.json
    python -m spade_edge_testing.trt_snapshot --out DIR  # write elsewhere (the live test does)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

#: the committed snapshots, read by fake_tensorrt and tests/test_trt_api.py
SNAP_DIR = Path(__file__).resolve().parent / "trt_snapshots"
#: the checkout's build/ (this package is installed editable from it: ``pip install -e tools``)
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "build" / "trt_api"

#: pip requirement -> snapshot file stem. 10.3 = JetPack 6 (Orin); 10.16 = last 10.x;
#: 11.0 = first 11.x; 11.4 = current server release.
SPECS: dict[str, str] = {
    "tensorrt-cu12-bindings==10.3.0": "trt-10.3.0",
    "tensorrt-cu12-bindings==10.16.1.11": "trt-10.16.1.11",
    "tensorrt-cu13-bindings==11.0.0.114": "trt-11.0.0.114",
    "tensorrt-cu13-bindings==11.4.0.106": "trt-11.4.0.106",
}

#: Classes whose method signatures are recorded (the ones spade-edge's code touches).
SIGNATURE_CLASSES = (
    "Builder",
    "IBuilderConfig",
    "INetworkDefinition",
    "ITensor",
    "ILayer",
    "IOptimizationProfile",
    "ITimingCache",
    "IHostMemory",
    "OnnxParser",
    "ParserError",
    "Runtime",
    "ICudaEngine",
    "IExecutionContext",
    "ILogger",
    "Logger",
    "Dims",
)

#: The C symbols tensorrt.so imports from TensorRT's libraries, per stub library.
_STUB_SOURCES = {
    "libnvinfer": """
void* createInferBuilder_INTERNAL(void* logger, int version) { return 0; }
void* createInferRuntime_INTERNAL(void* logger, int version) { return 0; }
void* createInferRefitter_INTERNAL(void* engine, void* logger, int version) { return 0; }
void* getPluginRegistry(void) { return 0; }
void* getBuilderPluginRegistry(int capability) { return 0; }
""",
    "libnvonnxparser": """
void* createNvOnnxParser_INTERNAL(void* network, void* logger, int version) { return 0; }
void* createNvOnnxParserRefitter_INTERNAL(void* refitter, void* logger, int version) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
""",
    "libnvinfer_plugin": """
int initLibNvInferPlugins(void* logger, const char* ns) { return 0; }
""",
}
_SIG_LINE = re.compile(r"^\s*(?:\d+\.\s+)?([A-Za-z_]\w*)\((.*)\)(?:\s*->\s*(.+))?\s*$")


# ------------------------------------------------------------------------- inside the import


def _dump() -> dict:
    """Runs in the subprocess where ``tensorrt_bindings`` imports against the stubs."""
    import tensorrt_bindings as trt

    classes: dict[str, dict[str, str]] = {}
    nested: list[tuple[str, type]] = []
    enums: dict[str, dict[str, int]] = {}
    todo = [(n, getattr(trt, n)) for n in sorted(dir(trt)) if not n.startswith("_")]
    while todo:
        cname, obj = todo.pop(0)
        if not inspect.isclass(obj) or cname in classes:
            continue
        members: dict[str, str] = {}
        for m in sorted(dir(obj)):
            if m.startswith("_") and m != "__init__":
                continue
            try:
                raw = inspect.getattr_static(obj, m)
            except AttributeError:
                raw = getattr(obj, m, None)
            if isinstance(raw, property):
                kind = "property"
            elif inspect.isclass(raw):
                kind = "class"
                nested.append((f"{cname}.{m}", raw))
            elif m in (getattr(obj, "__members__", None) or {}):
                kind = "value"  # a pybind11 enum member
            elif callable(raw) or isinstance(raw, (staticmethod, classmethod)):
                kind = "method"
            else:
                kind = "attribute"
            members[m] = kind
        classes[cname] = members
        enum_members = getattr(obj, "__members__", None)
        if enum_members:
            enums[cname] = {k: int(v) for k, v in enum_members.items()}
        todo.extend(nested)
        nested.clear()
    public = [n for n in dir(trt) if not n.startswith("_") or n == "__version__"]
    functions = sorted(n for n in public if n not in classes and callable(getattr(trt, n)))
    other = sorted(n for n in public if n not in classes and n not in functions)
    sigs: dict[str, list[str]] = {}
    for cname in SIGNATURE_CLASSES:
        for m, kind in classes.get(cname, {}).items():
            if kind != "method":
                continue
            doc = getattr(getattr(trt, cname), m).__doc__ or ""
            lines = []
            for line in doc.splitlines():
                mm = _SIG_LINE.match(line)
                if mm and mm.group(1) == m and "self" in mm.group(2):
                    lines.append(_normalise(line.strip()))
            sigs[f"{cname}.{m}"] = lines
    for fname in functions:
        doc = getattr(trt, fname).__doc__ or ""
        lines = [
            _normalise(ln.strip())
            for ln in doc.splitlines()
            if (mm := _SIG_LINE.match(ln)) and mm.group(1) == fname
        ]
        if not lines:  # a plain Python function of the package's __init__.py
            with contextlib.suppress(TypeError, ValueError):
                lines = [f"{fname}{inspect.signature(getattr(trt, fname))}"]
        sigs[fname] = lines
    return {
        "tensorrt_version": trt.__version__,
        "classes": classes,
        "functions": functions,
        "other": other,
        "signatures": sigs,
        "enums": enums,
    }


def _normalise(sig: str) -> str:
    """Drop the overload number and the module prefix so 10.x/11.x signatures compare."""
    sig = re.sub(r"^\d+\.\s+", "", sig)
    return sig.replace("tensorrt_bindings.tensorrt.", "trt.").replace("tensorrt_bindings.", "trt.")


# ------------------------------------------------------------------------- outside


def compile_stubs(dest: Path) -> Path:
    """Build stub libnvinfer/libnvonnxparser/libnvinfer_plugin .so.10 and .so.11 in ``dest``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) to build the stub libraries")
    dest.mkdir(parents=True, exist_ok=True)
    for lib, src in _STUB_SOURCES.items():
        c_file = dest / f"{lib}.c"
        c_file.write_text(src)
        for major in (10, 11):
            so = f"{lib}.so.{major}"
            subprocess.run(
                [cc, "-shared", "-fPIC", "-o", str(dest / so), f"-Wl,-soname,{so}", str(c_file)],
                check=True,
                capture_output=True,
            )
    return dest


def fetch_wheel(spec: str, cache: Path, timeout: float = 120.0) -> Path:
    """The bindings wheel for ``spec`` for this Python (cached; ``pip download`` otherwise)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = [w for w in wheels.glob(pattern) if f"-{tag}-" in w.name]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), spec],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        found = [w for w in wheels.glob(pattern) if f"-{tag}-" in w.name]
    if not found:
        raise RuntimeError(f"pip download {spec} gave no {tag} wheel")
    return found[0]


def snapshot(spec: str, cache: Path, stubs: Path) -> dict:
    """Import the real bindings of ``spec`` against the stubs (subprocess) and dump the API."""
    wheel = fetch_wheel(spec, cache)
    target = cache / "extracted" / wheel.stem
    if not (target / "tensorrt_bindings" / "tensorrt.so").is_file():
        shutil.rmtree(target, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(stubs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--dump"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"importing {spec} against the stubs failed:\n{proc.stderr[-2000:]}")
    data = json.loads(proc.stdout)
    data["wheel"] = wheel.name
    data["requirement"] = spec
    return data


def write_snapshots(out: Path, cache: Path = DEFAULT_CACHE) -> list[Path]:
    """Snapshot every version in SPECS into ``out/<stem>.json``; returns the written paths."""
    stubs = compile_stubs(cache / "stubs")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec, stem in SPECS.items():
        data = snapshot(spec, cache, stubs)
        path = out / f"{stem}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=SNAP_DIR)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    if args.dump:
        json.dump(_dump(), sys.stdout, sort_keys=True)
        return 0
    for p in write_snapshots(args.out, args.cache):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``spade-inspect FILE [--verify] [--json]``: print the header of any spade-edge artifact.

The artifact kind is picked from the file's first bytes (one small table), so a file with a
misleading name is still shown for what it is. Nothing but headers is read unless
``--verify`` asks for the checksums (gallery/engine blobs, ONNX graph fingerprint).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from spade_edge.cli import _common as common
from spade_edge.runtime import engine_file
from spade_edge.runtime.autoselect import select
from spade_edge.runtime.container import ENGINE_MAGIC, GALLERY_MAGIC, describe_foreign, peek_magic
from spade_edge.runtime.errors import BackendUnavailableError, FormatError, InputError
from spade_edge.runtime.gallery import Gallery, describe
from spade_edge.runtime.model_meta import graph_fingerprint, read_model_info


def inspect_gallery(path: Path, verify: bool) -> dict[str, Any]:
    with Gallery.open(path, verify=verify) as g:
        info = describe(g)
        src = g.sources
        info["sources"] = {"count": len(src), "first": src[:3]}
    info["verified"] = verify
    return info


def inspect_engine(path: Path, verify: bool) -> dict[str, Any]:
    """The engine module's own summary of the file (manifest, blobs, checksums if asked)."""
    info = dict(engine_file.describe(path, verify=verify))
    info.setdefault("verified", verify)
    return info


def inspect_onnx(path: Path, verify: bool) -> dict[str, Any]:
    mi = read_model_info(path)
    c = mi.contract
    other: dict[str, Any] = {}
    for k, v in mi.metadata.items():
        if k in ("spade_edge.contract", "spade_edge.fingerprint"):
            continue
        try:
            other[k] = json.loads(v)
        except ValueError:
            other[k] = v
    info: dict[str, Any] = {
        "kind": "onnx",
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "model_fingerprint": mi.fingerprint,
        "parent_fingerprint": c.parent_fingerprint,
        **c.summary(),
        "metadata": other,
        "verified": verify,
        "contract": c.to_dict(),
        # what --backend auto / --matcher auto pick for this model on this CPU, and why
        "auto_selection": select(path).to_dict(),
    }
    if verify:
        try:
            import onnx  # optional heavy dependency ([export] extra), only for --verify
        except ImportError:
            raise BackendUnavailableError(
                f"{path}: --verify on an ONNX model needs the onnx package "
                "(pip install 'spade-edge[export]')"
            ) from None
        model = onnx.load(str(path), load_external_data=False)
        fp = graph_fingerprint(model)
        if fp != mi.fingerprint:
            raise FormatError(
                f"{path}: graph fingerprint {fp} does not match the recorded {mi.fingerprint} "
                "(the graph was changed after export)"
            )
    return info


#: magic -> (kind, inspector). ONNX files are protobuf and have no magic: the fallback.
INSPECTORS: dict[bytes, tuple[str, Callable[[Path, bool], dict[str, Any]]]] = {
    GALLERY_MAGIC: ("gallery", inspect_gallery),
    ENGINE_MAGIC: ("engine", inspect_engine),
}


def inspect_file(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """Header summary of any spade-edge artifact as a JSON-able dict (``kind`` says which)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    head = peek_magic(p)
    if head in INSPECTORS:
        return INSPECTORS[head][1](p, verify)
    guess = describe_foreign(head)
    if p.suffix.lower() == ".onnx" or guess.startswith("is an ONNX"):
        return inspect_onnx(p, verify)
    raise FormatError(f"{p}: not a spade-edge artifact (magic {head!r}); it {guess}")


def _fmt(v: Any) -> Text:
    if isinstance(v, (dict, list)):
        return common.text(json.dumps(v, sort_keys=True, allow_nan=False))
    return common.text(v)


def render(info: dict[str, Any], console: Console) -> None:
    """Human view: key/value table, then the blob table when there is one."""
    t = Table(
        title=common.text(f"{info.get('kind', '?')}: {info.get('path', '')}"), show_header=False
    )
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in info.items():
        if k in ("kind", "path", "blobs", "contract"):
            continue
        if k == "auto_selection" and isinstance(v, dict):
            cpu = v.get("cpu", {})
            v = (
                f"backend {v.get('backend')}, matcher {v.get('matcher')}: {v.get('reason')} "
                f"(CPU units: {', '.join(cpu.get('matrix_flags', [])) or 'none'}; "
                f"from {cpu.get('source')})"
            )
        if k == "levels":
            v = ", ".join(
                f"{lv['name']} {'x'.join(map(str, lv['shape']))} (stride {lv['stride']})"
                for lv in v
            )
        elif k == "sources" and isinstance(v, dict):
            first = v.get("first") or []
            v = f"{v.get('count')} images" + (
                f" (first: {first[0]['name']}, sha256 {first[0]['sha256'][:16]}…)" if first else ""
            )
        elif k.endswith("_bytes") and isinstance(v, int):
            v = f"{v:,} B ({v / 1e6:.3f} MB)"
        t.add_row(common.text(k), _fmt(v))
    if "contract" in info:
        c = info["contract"]
        t.add_row(
            "preprocessing",
            common.text(
                f"{c.get('color')} resize {c.get('resize')} ({c.get('resize_interpolation')}, "
                f"antialias={c.get('antialias')}) → centre-crop {c.get('image_size')}, "
                f"mean {c.get('mean')} std {c.get('std')}"
            ),
        )
    console.print(t)
    blobs = info.get("blobs")
    if blobs:
        bt = Table(title="blobs")
        for col in ("name", "dtype", "shape", "bytes"):
            bt.add_column(col, justify="right" if col == "bytes" else "left")
        for name, b in blobs.items():
            bt.add_row(
                common.text(name),
                common.text(b["dtype"]),
                "x".join(map(str, b["shape"])),
                f"{b['nbytes']:,}",
            )
        console.print(bt)


app = common.new_app(
    "Show the header of a spade-edge artifact: ONNX model, gallery or engine file.",
    no_args_is_help=True,
)


@common.command(app)
def inspect_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Model, gallery or engine file.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Also check checksums / the graph fingerprint.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Print what FILE is and what it holds (headers only unless --verify)."""
    info = inspect_file(file, verify)
    if as_json:
        typer.echo(common.json_text(info, indent=2))
    else:
        render(info, common.out_console)


main = common.make_main(app)

if __name__ == "__main__":  # pragma: no cover
    main()

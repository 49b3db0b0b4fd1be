"""A tiny spade-edge ONNX model for fast tests (no torch, builds in milliseconds).

Why: every runtime piece (runners, packer, matchers, engine builder, INT8 calibration) needs a
real, loadable spade-edge model with the exact I/O conventions of an exported backbone, but
exporting Lite0/wrn50 in every test would blow the CI budget on 2 cores.

Graph: four stride-2 Conv+Relu stages (3 -> c0 -> c1 -> c2 -> c3 channels), the last three
tapped as pyramid levels ``layer1``/``layer2``/``layer3`` at strides 4/8/16, each transposed to
channels-last ``[B, H, W, C]``; ``pooled`` = global average of ``layer3`` ``[B, c3]``.
Input ``image`` float32 ``[B, 3, S, S]`` with a dynamic batch. Metadata: the spade-edge
contract and the fingerprint (SHA-256 of the deterministic graph serialisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spade_edge.runtime.contract import (
    METADATA_CONTRACT_KEY,
    METADATA_FINGERPRINT_KEY,
    Contract,
    Level,
    resize_for,
)
from spade_edge.runtime.model_meta import graph_fingerprint  # the product's rule, not a copy

TINY_CHANNELS = (8, 12, 16, 24)
TINY_OPSET = 17


def tiny_contract(image_size: int = 32, seed: int = 0) -> Contract:
    """The contract ``make_tiny_model`` writes (handy for fakes that need no ONNX file)."""
    if image_size % 16 or image_size < 16:
        raise ValueError(f"tiny model image_size must be a positive multiple of 16: {image_size}")
    levels = tuple(
        Level(
            name=f"layer{i + 1}",
            stride=s,
            channels=c,
            height=image_size // s,
            width=image_size // s,
        )
        for i, (s, c) in enumerate(zip((4, 8, 16), TINY_CHANNELS[1:], strict=True))
    )
    return Contract(
        backbone="tiny",
        weights=f"random-seed{seed}",
        levels=levels,
        pooled_dim=TINY_CHANNELS[-1],
        image_size=image_size,
        resize=resize_for(image_size),
    )


def make_tiny_model(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write the tiny spade-edge ONNX to ``path`` and return it (same seed -> same bytes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    contract = tiny_contract(image_size, seed)
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    prev, cin = "image", 3
    for i, cout in enumerate(TINY_CHANNELS):
        # He init keeps activations O(1) through the ReLUs, so features are not all zero.
        w = rng.normal(0.0, np.sqrt(2.0 / (cin * 9)), size=(cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0.0, 0.1, size=(cout,)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"conv{i}.w"),
            numpy_helper.from_array(b, f"conv{i}.b"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, f"conv{i}.w", f"conv{i}.b"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        prev, cin = f"relu{i}", cout
    outputs = []
    for i, lv in enumerate(contract.levels):
        nodes.append(helper.make_node("Transpose", [f"relu{i + 1}"], [lv.name], perm=[0, 2, 3, 1]))
        outputs.append(
            helper.make_tensor_value_info(
                lv.name, TensorProto.FLOAT, ["batch", lv.height, lv.width, lv.channels]
            )
        )
    last = f"relu{len(TINY_CHANNELS) - 1}"
    nodes.append(helper.make_node("GlobalAveragePool", [last], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], [contract.pooled_name], axis=1))
    outputs.append(
        helper.make_tensor_value_info(
            contract.pooled_name, TensorProto.FLOAT, ["batch", contract.pooled_dim]
        )
    )
    graph = helper.make_graph(
        nodes,
        "spade_edge_tiny",
        [
            helper.make_tensor_value_info(
                contract.input_name, TensorProto.FLOAT, ["batch", 3, image_size, image_size]
            )
        ],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", TINY_OPSET)],
        producer_name="spade-edge-tests",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    fp = graph_fingerprint(model)
    helper.set_model_props(
        model, {METADATA_CONTRACT_KEY: contract.to_json(), METADATA_FINGERPRINT_KEY: fp}
    )
    out = Path(path)
    out.write_bytes(model.SerializeToString(deterministic=True))
    return out


__all__ = ["TINY_CHANNELS", "graph_fingerprint", "make_tiny_model", "tiny_contract"]

"""Builds runtime/matchers/lowp_int8.onnx (the exact int8 matcher's GEMM + row-min graph).

The runtime ships the bytes so the lean install needs no onnx; test_exact_lowp.py checks the
shipped file equals this builder's output. Regenerate: ``python tests/lowp_graph.py``.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "runtime" / "matchers" / "lowp_int8.onnx"


def int8_graph_bytes() -> bytes:
    """Y = a_scale·b_scale[j]·(A − a_zero)(B − b_zero[j]) + bias[j]; M = min over j of Y."""
    from onnx import TensorProto as T
    from onnx import helper

    vi = helper.make_tensor_value_info
    mm = helper.make_node(
        "MatMulIntegerToFloat",
        ["A", "B", "a_scale", "b_scale", "a_zero", "b_zero", "bias"],
        ["Y"],
        domain="com.microsoft",
    )
    mn = helper.make_node("ReduceMin", ["Y", "axes"], ["M"], keepdims=0)
    graph = helper.make_graph(
        [mm, mn],
        "spade_exact_int8_candidates",
        [
            vi("A", T.UINT8, ["P", "C"]),
            vi("B", T.INT8, ["C", "N"]),
            vi("a_scale", T.FLOAT, []),
            vi("b_scale", T.FLOAT, ["N"]),
            vi("a_zero", T.UINT8, []),
            vi("b_zero", T.INT8, ["N"]),
            vi("bias", T.FLOAT, ["N"]),
        ],
        [vi("Y", T.FLOAT, ["P", "N"]), vi("M", T.FLOAT, ["P"])],
        [helper.make_tensor("axes", T.INT64, [1], [1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
        producer_name="spade-edge",
    )
    model.ir_version = 8
    return model.SerializeToString(deterministic=True)


if __name__ == "__main__":
    SHIPPED.write_bytes(int8_graph_bytes())
    print(f"wrote {SHIPPED}")

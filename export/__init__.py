"""spade_edge.export: backbones in plain torch, weights, ONNX export and TensorRT engine build.

Needs the ``[export]`` extra (torch, onnx, onnxscript); TensorRT needs ``[trt]``.
"""

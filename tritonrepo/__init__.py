"""SPADE on NVIDIA Triton Inference Server: model repositories and a local server for tests.

``spade_edge.triton.repository`` writes the model repository (``spade-triton``);
``spade_edge.triton.model`` is the Python-backend model copied into each version folder;
``spade_edge.triton.server`` starts the ``tritonserver`` that the ``nvidia-pytriton`` wheel
bundles (tests, benchmark). The client side is the ``triton`` runner
(``spade_edge.runtime.runners.triton``). See docs/triton.md.
"""

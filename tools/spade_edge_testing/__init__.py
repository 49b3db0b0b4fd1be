"""spade-edge's test scaffolding, shared by tests/, scripts/ and benches/ (never by the product).

* :mod:`~spade_edge_testing.simt_device`: the SIMT emulator (``simt/``, C++) that runs the
  shipped CUDA kernels on the CPU, and guarded host memory standing in for device memory;
* :mod:`~spade_edge_testing.fake_pycuda`: the one fake ``pycuda`` (driver + compiler), backed by
  the emulator (CudaMatcher's kernels really run) or by plain guarded memory (TensorRT fake);
* :mod:`~spade_edge_testing.fake_tensorrt`: a strict fake ``tensorrt`` generated from snapshots
  (``trt_snapshots/``) of the real bindings, which :mod:`~spade_edge_testing.trt_snapshot` makes;
* :mod:`~spade_edge_testing.matching`: random galleries in the matcher tests' shapes and the
  comparison with the NumPy oracle;
* :mod:`~spade_edge_testing.station_helpers`, :mod:`~spade_edge_testing.station_server`: free
  loopback ports, bounded waits, a mosquitto broker, spade-serve with the station on a thread.

What the emulator proves and what it cannot: docs/cuda.md. Installed from the checkout with
``pip install -e tools`` (``make install`` does it); not part of the spade-edge wheel, and
import-linter forbids the product's packages to import it.
"""

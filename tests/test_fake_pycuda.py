"""The one fake pycuda (spade_edge_testing.fake_pycuda) refuses what a GPU would refuse.

The TensorRT-runner and CUDA-matcher tests rely on these refusals to check the code's context
discipline and buffer bounds; if the fake stopped refusing, those checks would pass vacuously.
"""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge_testing import fake_pycuda
from spade_edge_testing.fake_pycuda import ContextError, FakeGpu


def test_driver_calls_need_a_current_context() -> None:
    gpu = FakeGpu()
    drv = fake_pycuda.make_pycuda(gpu).driver
    with pytest.raises(ContextError, match="mem_alloc without a current context"):
        drv.mem_alloc(64)
    ctx = drv.Device(0).retain_primary_context()
    ctx.push()
    buf = drv.mem_alloc(64)
    drv.memcpy_htod(buf, np.arange(16, dtype=np.float32))
    drv.Context.pop()
    out = np.empty(16, np.float32)
    for call in (
        lambda: drv.memcpy_dtoh(out, buf),
        lambda: drv.Stream().synchronize(),
        buf.free,
    ):
        with pytest.raises(ContextError):
            call()
    ctx.push()
    drv.memcpy_dtoh(out, buf)
    buf.free()
    drv.Context.pop()
    np.testing.assert_array_equal(out, np.arange(16, dtype=np.float32))
    assert (gpu.allocs, gpu.frees, gpu.memory) == (1, 1, {})
    ctx.detach()
    assert gpu.retained == gpu.detached == 1


def test_copies_outside_an_allocation_are_errors() -> None:
    gpu = FakeGpu()
    drv = fake_pycuda.make_pycuda(gpu).driver
    drv.Device(0).retain_primary_context().push()
    buf = drv.mem_alloc(64)
    assert drv.mem_get_info()[0] == fake_pycuda.TOTAL_MEMORY - 64
    with pytest.raises(drv.Error, match="out of bounds"):
        drv.memcpy_htod(buf, np.zeros(17, np.float32))  # 68 bytes into 64
    with pytest.raises(drv.Error, match="out of bounds"):
        drv.memcpy_dtoh(np.empty(2, np.float32), int(buf) + 60)  # 8 bytes from the last 4
    with pytest.raises(drv.Error, match="contiguous"):
        drv.memcpy_dtoh(np.empty((4, 4), np.float32)[:, ::2], buf)
    with pytest.raises(drv.Error, match="no device 1"):
        drv.Device(1)
    drv.Context.pop()

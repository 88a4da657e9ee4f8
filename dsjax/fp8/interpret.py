"""Every FP8 GPU kernel of `kernel_backend="pallas_gpu"` through Pallas's interpreters, on CPU.

    interpret.use_interpreters()                      # CPU dry runs (scripts/check_fp8_*.py --cpu-interpret)
    interpret.use_interpreters(monkeypatch.setattr)   # tests: undone after the test

The Mosaic GPU kernels (dense and grouped GEMMs) run in Mosaic GPU's interpreter (jax >= 0.11),
the Triton quantization kernels in Pallas's interpreter, and `jax.default_backend` reports "gpu"
so that the backend's off-GPU check lets them through.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax


def use_interpreters(set_attr: Callable = setattr, num_ctas: int = 2) -> None:
    """Points the FP8 modules at interpreted kernels (`set_attr(module, name, value)` for each)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from dsjax.fp8 import grouped_kernel, kernel, quantize_kernel

    mgpu = plgpu.InterpretGPUParams()
    for module, name in ((kernel, "block_scaled_matmul"), (grouped_kernel, "m_grouped_matmul"),
                         (grouped_kernel, "k_grouped_matmul")):
        set_attr(module, name, functools.partial(getattr(module, name), interpret=mgpu, num_ctas=num_ctas))
    for name in ("quantize_rows_and_tiles", "quantize_weight_blocks"):
        set_attr(quantize_kernel, name, functools.partial(getattr(quantize_kernel, name), interpret=True))
    set_attr(jax, "default_backend", lambda: "gpu")

"""kernel_backend "pallas_gpu" away from a GPU, and the Pallas block-scaled FP8 kernel's logic on CPU.

The kernel itself (dsjax/fp8/kernel.py) needs Hopper; scripts/check_fp8_kernel.py checks and times it
there. Here: the backend raises a clear error on CPU without importing Mosaic GPU, and, where JAX
ships Pallas's Mosaic GPU interpreter (jax >= 0.11), the kernel's tiling, scale orientation and
padding match dot.py's split-K reference on the same quantized operands (all three GEMMs through
make_dot run in scripts/check_fp8_kernel.py --cpu-interpret, a few minutes)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import fp8
from mgpu_interpreter import interpreter_params, needs_interpreter
from dsjax.fp8 import dot as fp8_dot
from dsjax.fp8.quantize import quantize_blocks


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU/TPU error")
@pytest.mark.parametrize("batched", [False, True])
def test_pallas_gpu_backend_off_gpu_raises_clear_error(batched):
    imported_before = "dsjax.fp8.kernel" in sys.modules
    dot = fp8.make_dot("block", "pallas_gpu")
    x, w = jnp.ones((2, 8, 256)), jnp.ones((2, 256, 128)) if batched else jnp.ones((256, 128))
    with pytest.raises(ValueError, match="pallas_gpu.*default backend is"):
        dot(x, w, batched=batched)
    if not imported_before:
        assert "dsjax.fp8.kernel" not in sys.modules  # CPU paths never import Mosaic GPU


@needs_interpreter
@pytest.mark.parametrize("M,K,N", [(256, 384, 256), (100, 200, 136)])  # aligned; padded M, K and N
def test_kernel_matches_split_k_in_interpreter(M, K, N):
    from dsjax.fp8 import kernel

    kx, kw, ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (M, K)) * jnp.exp(jax.random.normal(ks, (M, 1)))  # per-row scales matter
    w = jax.random.normal(kw, (K, N))
    qx, sx = quantize_blocks(x, (1, 128))
    qw, sw = quantize_blocks(w, (128, 128))
    sb = fp8_dot._per_column(sw, N)
    want = fp8_dot._split_k_matmul(qx, sx, qw, sb, "xla_cpu")
    got = kernel.block_scaled_matmul(qx, sx, qw.T, sb, jnp.float32, interpret=interpreter_params()(), num_ctas=2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))

"""FP8 block-scaled grouped GEMM (dsjax/fp8/grouped.py, grouped_kernel.py): pairs that must agree.

- gmm_block's reference path (xla_cpu) vs a per-expert loop of dot.py's dense block-mode dot on each
  group's rows: y, dx and dw to float32 rounding (same tiles, same scales, same E4M3 values), with
  uneven groups, empty experts and groups that are not multiples of 128 rows;
- the same vs the float32 unquantized grouped product: within FP8 error;
- rows past sum(group_sizes) are zero, and so are their dx;
- where JAX ships Pallas's Mosaic GPU interpreter (jax >= 0.11): the M-grouped (forward, dgrad) and
  K-grouped (wgrad) kernels vs the reference path on the same quantized operands, and both kernels
  lower for CUDA (sm_90) on CPU.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import fp8
from mgpu_interpreter import interpreter_params, needs_interpreter
from dsjax.fp8 import grouped
from dsjax.fp8.quantize import quantize_blocks

F32_RTOL = 2e-5  # float32 rounding of a different summation order
FP8_RTOL = 5e-2  # relative Frobenius error of the FP8 recipe vs unquantized float32
KERNEL_RTOL = 1e-5  # kernel vs reference on the same quantized operands

# K, N, group sizes, M (rows past the groups are padding): 300 and 5 are not multiples of 128,
# two experts are empty, and the last case has an empty first expert and 20 trailing rows.
CASES = [
    (256, 384, (300, 0, 5, 160), 465),
    (200, 136, (0, 131, 129, 0), 280),
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _operands(K, N, sizes, M, seed=0):
    kx, kw, ks, kd = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (M, K)) * jnp.exp(jax.random.normal(ks, (M, 1)))  # per-row scales matter
    w = jax.random.normal(kw, (len(sizes), K, N)) * 0.05
    dy = jax.random.normal(kd, (M, N))
    return x, w, jnp.asarray(sizes, jnp.int32), dy


def _vjp(f, x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


def _per_expert_dense(x, w, sizes, dy):
    """y, dx, dw from dot.py's block-mode dot, one call per nonempty expert on its own rows."""
    dot = fp8.make_dot("block", "xla_cpu")
    M, N = x.shape[0], w.shape[2]
    y, dx, dw = np.zeros((M, N), np.float32), np.zeros(x.shape, np.float32), np.zeros(w.shape, np.float32)
    start = 0
    for g, s in enumerate(sizes):
        if s:
            rows = slice(start, start + s)
            y[rows], dx[rows], dw[g] = _vjp(dot, x[rows], w[g], dy[rows])
        start += s
    return y, dx, dw


@pytest.mark.parametrize("K,N,sizes,M", CASES)
def test_reference_matches_per_expert_dense_dot(K, N, sizes, M):
    x, w, gs, dy = _operands(K, N, sizes, M)
    got = jax.jit(lambda x, w, dy: _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy))(x, w, dy)
    want = _per_expert_dense(x, w, sizes, dy)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert g.dtype == jnp.float32, name
        assert _rel(g, r) < F32_RTOL, (name, _rel(g, r))
    total = sum(sizes)
    assert not np.asarray(got[0][total:]).any() and not np.asarray(got[1][total:]).any()
    for g, s in enumerate(sizes):
        if not s:
            assert not np.asarray(got[2][g]).any()


@pytest.mark.parametrize("K,N,sizes,M", CASES[:1])
def test_reference_within_fp8_error_of_f32(K, N, sizes, M):
    x, w, gs, dy = _operands(K, N, sizes, M, seed=1)

    def f32(x, w):
        return jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)

    got = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy)
    want = _vjp(f32, x, w, dy)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert _rel(g, r) < FP8_RTOL, (name, _rel(g, r))


def test_dtypes_bf16_x_f32_w():
    x, w, gs, dy = _operands(128, 128, (70, 0, 58), 140)
    x = x.astype(jnp.bfloat16)
    y, dx, dw = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy.astype(jnp.bfloat16))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_gmm_block_takes_weights_to_concatenate():
    """w as a tuple (the experts' gate and up as one GEMM) gives exactly the GEMM of their
    concatenation along N — output, dx — and the concatenation's dw, split back per weight."""
    x, w, gs, dy = _operands(128, 384, (70, 0, 58), 140)
    w_a, w_b = w[:, :, :128], w[:, :, 128:]
    y, dx, dw = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy)
    y2, dx2, (dw_a, dw_b) = _vjp(lambda x, ws: grouped.gmm_block(x, ws, gs, "xla_cpu"), x, (w_a, w_b), dy)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(np.concatenate([dw_a, dw_b], axis=2), dw)
    with pytest.raises(ValueError, match="tuple of"):
        grouped.gmm_block(x, (w_a, w_b[:, :64]), gs, "xla_cpu")


def test_wgrad_tiles_start_at_each_group():
    """quantize_wgrad's tiles are quantize_blocks' 128x1 tiles of each group's own rows."""
    x, _, gs, _ = _operands(64, 8, (130, 0, 3), 140)
    q_DP, s_DT = grouped.quantize_wgrad(x, gs)
    (q0, s0), (q2, s2) = quantize_blocks(x[:130], (128, 1)), quantize_blocks(x[130:133], (128, 1))
    np.testing.assert_array_equal(np.asarray(q_DP[:, :130].T, np.float32), np.asarray(q0, np.float32))
    np.testing.assert_array_equal(np.asarray(s_DT[:, :2].T), np.asarray(s0))
    np.testing.assert_array_equal(np.asarray(q_DP[:, 256:259].T, np.float32), np.asarray(q2, np.float32))
    np.testing.assert_array_equal(np.asarray(s_DT[:, 2:3].T), np.asarray(s2))
    assert not np.asarray(q_DP[:, 130:256], np.float32).any() and not np.asarray(q_DP[:, 259:], np.float32).any()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU/TPU error")
def test_pallas_gpu_off_gpu_raises_clear_error():
    imported_before = "dsjax.fp8.grouped_kernel" in sys.modules
    x, w, gs, _ = _operands(128, 128, (8, 8), 16)
    with pytest.raises(ValueError, match="pallas_gpu.*default backend is"):
        grouped.gmm_block(x, w, gs, "pallas_gpu")
    if not imported_before:
        assert "dsjax.fp8.grouped_kernel" not in sys.modules  # CPU paths never import Mosaic GPU


# ---- kernels, in Pallas's Mosaic GPU interpreter -------------------------------------------------

def _quantized(K, N, sizes, M, seed=0):
    """The quantized operands of all three GEMMs, as gmm_block's custom_vjp builds them."""
    x, w, gs, dy = _operands(K, N, sizes, M, seed)
    qx, sx = quantize_blocks(x, (1, 128))
    qw, sw = quantize_blocks(w, (128, 128))
    qdy, sdy = quantize_blocks(dy, (1, 128))
    fwd = (qx, sx, qw.transpose(0, 2, 1), grouped._per_column(sw, N), gs)
    dgrad = (qdy, sdy, qw, grouped._per_column(sw.transpose(0, 2, 1), K), gs)
    wgrad = (*grouped.quantize_wgrad(x, gs), *grouped.quantize_wgrad(dy, gs), gs)
    return fwd, dgrad, wgrad


# (128, 256, ...) is aligned; (200, 136, ...) pads K and N, 465 pads M; a group of 300 rows spans
# three tiles, one of 5 sits inside a tile shared with two neighbours.
KERNEL_CASES = [(256, 256, (100, 0, 5, 200, 15), 330), (200, 136, (300, 0, 5, 160), 465)]


@needs_interpreter
@pytest.mark.parametrize("K,N,sizes,M", KERNEL_CASES)
def test_m_grouped_kernel_matches_reference_in_interpreter(K, N, sizes, M):
    from dsjax.fp8 import grouped_kernel

    interpret = interpreter_params()()
    for args in _quantized(K, N, sizes, M)[:2]:
        want = grouped._m_grouped(*args, "xla_cpu", jnp.float32)
        got = grouped_kernel.m_grouped_matmul(*args, jnp.float32, sb_blocked=True, interpret=interpret,
                                              num_ctas=2)
        assert _rel(got, want) < KERNEL_RTOL, _rel(got, want)
        assert not np.asarray(got[sum(sizes):]).any()


@needs_interpreter
@pytest.mark.parametrize("K,N,sizes,M", KERNEL_CASES[1:])
def test_k_grouped_kernel_matches_reference_in_interpreter(K, N, sizes, M):
    from dsjax.fp8 import grouped_kernel

    qa, sa, qb, sb, gs = _quantized(K, N, sizes, M)[2]
    want = grouped._k_grouped(qa, sa, qb, sb, gs, "xla_cpu", jnp.float32)
    _, tile_start, tiles = grouped.group_tiles(gs, 0)
    got = grouped_kernel.k_grouped_matmul(qa, sa, qb, sb, tile_start, tiles, jnp.float32,
                                          interpret=interpreter_params()(), num_ctas=2)
    assert got.shape == (len(sizes), K, N)
    assert _rel(got, want) < KERNEL_RTOL, _rel(got, want)


@needs_interpreter
def test_kernels_lower_for_cuda():
    """Pallas -> Mosaic GPU lowering for sm_90 on CPU (no PTX): tiling, transforms, smem budget."""
    from dsjax.fp8 import grouped_kernel

    fwd, _, wgrad = _quantized(640, 256, (100, 0, 5, 200, 15), 330)  # 5 K-steps: all 4 stages allocated
    _, tile_start, tiles = grouped.group_tiles(wgrad[-1], 0)
    m_fn = jax.jit(lambda *a: grouped_kernel.m_grouped_matmul(*a, jnp.bfloat16, sb_blocked=True, num_ctas=132))
    k_fn = jax.jit(lambda *a: grouped_kernel.k_grouped_matmul(*a, jnp.float32, num_ctas=132))
    for fn, args in ((m_fn, fwd), (k_fn, (*wgrad[:4], tile_start, tiles))):
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


@needs_interpreter
def test_gmm_block_pallas_gpu_matches_reference_in_interpreter(monkeypatch):
    """The whole custom_vjp with backend "pallas_gpu" (all three GEMMs and the fused quantizations in
    the kernels, run by the interpreters) vs xla_cpu; also with the weights given as a tuple (the
    weights' kernel reading two inputs)."""
    from dsjax.fp8 import interpret

    x, w, gs, dy = _operands(256, 256, (70, 0, 150, 9), 240)
    want = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy)
    interpret.use_interpreters(monkeypatch.setattr)
    got = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "pallas_gpu"), x, w, dy)
    y2, dx2, dws = _vjp(lambda x, ws: grouped.gmm_block(x, ws, gs, "pallas_gpu"), x, (w[..., :128], w[..., 128:]), dy)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert _rel(g, r) < KERNEL_RTOL, (name, _rel(g, r))
    for name, g, r in zip(("y", "dx", "dw"), (y2, dx2, jnp.concatenate(dws, axis=2)), got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=name)

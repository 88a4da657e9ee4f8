"""Warp-specialized bf16 grouped GEMMs (dsjax/model/grouped_gemm_kernel.py) and their tile schedule
(dsjax/group_tiles.py): pairs that must agree.

- m_tile_schedule's tiles vs the groups' row ranges: every row of every group is stored exactly
  once, by a tile of its own group, and rows outside the groups by none;
- where JAX ships Pallas's Mosaic GPU interpreter (jax >= 0.11): the M-grouped kernel (forward;
  input gradient, the weights read transposed) and the K-grouped kernel (weight gradient) vs a
  float32 per-group product of the same bf16 operands, with uneven groups, an empty group, groups
  sharing a row tile and rows past the groups; an empty group's weight gradient is exactly zero;
- both kernels lower for CUDA (sm_90) on CPU with the default tiles, and bad tiles are refused
  with the reason.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.group_tiles import m_tile_schedule
from mgpu_interpreter import interpreter_params, needs_interpreter

# Outputs are bf16: rounding an f32 sum to bf16 moves it by at most 2^-9 of itself, so the relative
# Frobenius error is at most 2^-9; 1e-5 more covers the f32 summation order.
BF16_OUT_RTOL = 2.0 ** -9 + 1e-5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("sizes,m,tile_m", [((100, 0, 5, 200, 15), 384, 128), ((0, 64, 1, 63, 0), 128, 64),
                                            ((0, 0, 0), 128, 128), ((300,), 384, 128)])
def test_m_tile_schedule_stores_each_row_once_by_its_group(sizes, m, tile_m):
    sched = np.asarray(m_tile_schedule(jnp.asarray(sizes, jnp.int32), m, tile_m))
    assert sched.shape == (4, m // tile_m + len(sizes) - 1)
    owner = np.full(m, -1)
    for group, block, first, rows in sched.T:
        if rows == 0:
            continue
        lo = block * tile_m + first
        assert 0 <= first and first + rows <= tile_m, "a tile stores only rows of its own block"
        assert (owner[lo:lo + rows] == -1).all(), "a row stored twice"
        owner[lo:lo + rows] = group
    want = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)] + [np.full(m - sum(sizes), -1)])
    np.testing.assert_array_equal(owner, want)


def _operands(m, k, n, sizes, seed=0):
    r = np.random.RandomState(seed)
    x = jnp.asarray(r.randn(m, k), jnp.bfloat16)
    w = jnp.asarray(r.randn(len(sizes), k, n) / np.sqrt(k), jnp.bfloat16)
    dy = jnp.asarray(r.randn(m, n), jnp.bfloat16)
    return x, w, dy


def _per_group(sizes, fn):
    """fn(group index, row slice) for each group, stacked."""
    ends = np.cumsum(sizes)
    return [fn(g, slice(int(e - s), int(e))) for g, (s, e) in enumerate(zip(sizes, ends))]


# (tiles, M, K, N, sizes): groups of 5 and 15 rows share a tile with their neighbours, one group is
# empty, the last rows are in no group; the second case runs the default tiles.
KERNEL_CASES = [((64, 64, 64, 2, 2), 256, 256, 256, (50, 0, 5, 110, 15)),
                ((128, 128, 64, 3, 8), 384, 256, 512, (100, 0, 5, 200, 15))]


@needs_interpreter
@pytest.mark.parametrize("tiles,m,k,n,sizes", KERNEL_CASES)
def test_m_grouped_kernel_matches_per_group_products_in_interpreter(tiles, m, k, n, sizes):
    from dsjax.model import grouped_gemm_kernel as gk

    x, w, dy = _operands(m, k, n, sizes)
    gs, s = jnp.asarray(sizes, jnp.int32), sum(sizes)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    run = dict(interpret=interpreter_params()(), num_ctas=2)
    y = gk.m_grouped(x, w, gs, False, gk.Tiles(*tiles), **run)
    want_y = np.concatenate(_per_group(sizes, lambda g, rows: f32(x)[rows] @ f32(w)[g]))
    assert _rel(f32(y)[:s], want_y) < BF16_OUT_RTOL
    dx = gk.m_grouped(dy, w, gs, True, gk.Tiles(*tiles), **run)  # K is the output width here
    want_dx = np.concatenate(_per_group(sizes, lambda g, rows: f32(dy)[rows] @ f32(w)[g].T))
    assert _rel(f32(dx)[:s], want_dx) < BF16_OUT_RTOL


@needs_interpreter
@pytest.mark.parametrize("tiles,m,k,n,sizes", KERNEL_CASES)
def test_k_grouped_kernel_matches_per_group_products_in_interpreter(tiles, m, k, n, sizes):
    from dsjax.model import grouped_gemm_kernel as gk

    x, _, dy = _operands(m, k, n, sizes, seed=1)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    dw = gk.k_grouped(x, dy, jnp.asarray(sizes, jnp.int32), gk.Tiles(*tiles),
                      interpret=interpreter_params()(), num_ctas=2)
    want = np.stack(_per_group(sizes, lambda g, rows: f32(x)[rows].T @ f32(dy)[rows]))
    assert dw.shape == (len(sizes), k, n)
    assert _rel(dw, want) < BF16_OUT_RTOL
    assert not np.asarray(dw[1]).any(), "an empty group's weight gradient is zero"


def test_kernels_lower_for_cuda():
    """Pallas -> Mosaic GPU lowering for sm_90 on CPU (no PTX) with the default tiles: transforms,
    the warp-specialized pipelines, the shared-memory budget."""
    from dsjax.model import grouped_gemm_kernel as gk

    x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 512, 512), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((4,), jnp.int32)
    for fn, args in ((lambda x, w, gs: gk.m_grouped(x, w, gs, False, num_ctas=132), (x, w, gs)),
                     (lambda dy, w, gs: gk.m_grouped(dy, w, gs, True, num_ctas=132), (x, w, gs)),
                     (lambda x, dy, gs: gk.k_grouped(x, dy, gs, num_ctas=132), (x, x, gs))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


def test_bad_tiles_are_refused_with_the_reason():
    from dsjax.model import grouped_gemm_kernel as gk

    x = jnp.zeros((256, 256), jnp.bfloat16)
    w = jnp.zeros((2, 256, 256), jnp.bfloat16)
    gs = jnp.asarray([100, 100], jnp.int32)
    with pytest.raises(ValueError, match="shared memory"):
        gk.m_grouped(x, w, gs, False, gk.Tiles(stages=4))
    with pytest.raises(ValueError, match="power-of-two tile_m"):
        gk.m_grouped(x, w, gs, False, gk.Tiles(tile_m=192, tile_n=64))
    with pytest.raises(ValueError, match="delay_release=0 only"):
        gk.k_grouped(x, x, gs, gk.Tiles(delay_release=1))
    with pytest.raises(ValueError, match="multiples"):
        gk.m_grouped(x, w[..., :192], gs)  # N = 192: not two 128-wide slices

"""Block-scaled FP8 grouped GEMM for the routed experts (DeepSeek-V3 §3.3 applied to §2.1.2's MoE).

    y_MN = gmm_block(x_MK, w_GKN, group_sizes_G, backend, out_dtype)

y[rows of group g] = x[rows of group g] @ w[g] over rows sorted into contiguous groups (experts);
rows past sum(group_sizes) belong to no group and come back as zeros. The three GEMMs of the
custom_vjp follow dot.py's block mode, expert by expert:
- forward  y  = x @ w[g]      x in 1x128 tiles along K (per row), each w[g] in 128x128 blocks;
- dgrad    dx = dy @ w[g]^T   dy in 1x128 tiles along N, the same w[g] blocks transposed;
- wgrad    dw[g] = x_g^T dy_g x and dy re-quantized in 128x1 tiles along tokens (§3.3.3), the
                              128-row tiles counted from each group's first row.
Each 128-slice of the contraction has its own scales and is promoted to float32 on its own
(§3.3.2). dx comes back in x's dtype, dw in w's dtype; group_sizes gets no gradient. The forward
caches x already quantized for wgrad (fp8, in the layout below) and w itself, as dot.py does. w's
blocks may come made by the caller (`blocks`: all layers' at once before a layer scan,
dsjax.model.fp8_weights); they are then a scanned input the backward reads in place, not a residual.

Wgrad's layout: each group's rows are gathered into a segment that starts on a multiple of 128
rows and is zero-padded to one (`_pad_groups`, [P, D] with P = 128 * T, T bounding the tiles of
all groups), then transposed so that tokens are the contiguous dim and quantized in 1x128 tiles
along it: exactly the per-group 128x1 tiles, with no tile spanning two experts and aligned tiles
for the kernel. The zero rows add nothing.

Backends (config value, never probed): "xla_cpu", "xla_gpu", "xla_tpu" run exact math on the
quantized operands (dequantized to float32, one HIGHEST-precision ragged dot accumulating in
float32; a product of two E4M3 values is exact in float32, so this differs from per-chunk
promotion only by float32 rounding). It is the CPU path and the reference for the kernels.
"pallas_gpu" runs grouped_kernel.py's Mosaic GPU kernels (M-grouped for forward and dgrad,
K-grouped for wgrad), imported on first use; shapes they cannot take fall back to the reference
path with one warning per shape, and off a GPU it raises dot._check_gpu's error. It also quantizes
through quantize_kernel.py's fused kernels: x (and dy) into its 1x128 row tiles and wgrad's layout
in one pass (`quantize_activation`), w into both K-major orientations in one pass.

GEMM-local letters as in dot.py: M rows (tokens x top-k, sorted by expert), K contraction of the
forward, N its output columns, G groups; J, L count the 128-blocks of K, N; P rows of the padded
wgrad layout and T its 128-row tiles.

Deviation: DeepSeek pads each expert's segment to a multiple of 128 rows before its grouped GEMMs;
dsjax keeps the unpadded rows for forward and dgrad and pads only wgrad's operands, which gives
the same 128x1 tiles (tests/test_fp8_grouped.py checks them against a per-expert loop of dot.py's
dense block dot). Zero and partial edge blocks as in quantize.py.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsjax.fallbacks import warn_once
from dsjax.fp8.dot import BACKENDS, BLOCK, _check_gpu
from dsjax.fp8.quantize import dequantize_blocks, quantize_blocks
from dsjax.fp8.quantize_kernel import WeightBlocks, weight_blocks
from dsjax.remat_names import FP8_OPERANDS, saved

log = logging.getLogger(__name__)


# ---- wgrad's group-aligned layout ---------------------------------------------------------------

def group_tiles(group_sizes_G: jax.Array, m: int) -> tuple[int, jax.Array, jax.Array]:
    """(T, tile_start_G, tiles_G): a static bound T on the 128-row tiles of all groups
    (sum ceil(s/128) <= (m + 127 G) / 128), and each group's first tile and tile count."""
    num_tiles = (m + (BLOCK - 1) * group_sizes_G.shape[0]) // BLOCK
    tiles_G = (group_sizes_G + BLOCK - 1) // BLOCK
    return num_tiles, jnp.cumsum(tiles_G) - tiles_G, tiles_G


def tile_rows(group_sizes_G: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(row_start_T, rows_T): for each 128-row tile of the weight-gradient layout, the row of x it
    starts at and how many of its rows hold data (0 for tiles past the groups)."""
    num_tiles, tile_start_G, tiles_G = group_tiles(group_sizes_G, m)
    t_T = jnp.arange(num_tiles, dtype=jnp.int32)
    g_T = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_G), t_T, side="right"), group_sizes_G.shape[0] - 1)
    r0_T = (t_T - tile_start_G[g_T]) * BLOCK  # the tile's first row within its group
    row_start_G = jnp.cumsum(group_sizes_G) - group_sizes_G
    return (row_start_G[g_T] + r0_T).astype(jnp.int32), jnp.clip(group_sizes_G[g_T] - r0_T, 0, BLOCK).astype(jnp.int32)


def _pad_groups(x_MD: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """x_PD: each group's rows from its first tile on, zeros elsewhere (a gather: one pass over x)."""
    start_T, rows_T = tile_rows(group_sizes_G, x_MD.shape[0])
    p_P = jnp.arange(start_T.shape[0] * BLOCK, dtype=jnp.int32)
    t_P, r_P = p_P // BLOCK, p_P % BLOCK
    src_P = jnp.clip(start_T[t_P] + r_P, 0, x_MD.shape[0] - 1)
    return jnp.where((r_P < rows_T[t_P])[:, None], x_MD[src_P], jnp.zeros((), x_MD.dtype))


def quantize_activation(x_MD: jax.Array, group_sizes_G: jax.Array, backend: str):
    """(q_MD, s_MJ, qt_DP, st_DT): x in 1x128 tiles per row (forward, dgrad) and in the weight
    gradient's tiles (`quantize_wgrad`). "pallas_gpu" makes both in one pass over x
    (quantize_kernel.py); other backends, and shapes the kernel cannot take, run the XLA passes."""
    if backend == "pallas_gpu":
        from dsjax.fp8 import quantize_kernel

        reason = quantize_kernel.unfit_reason(x_MD, group_sizes_G.shape[0])
        if reason is None:
            return quantize_kernel.quantize_rows_and_tiles(x_MD, group_sizes_G)
        warn_once(log, ("quantize", reason), f"kernel_backend='pallas_gpu' cannot quantize {reason} in one "
                  "pass; using XLA's")
    return (*quantize_blocks(x_MD, (1, BLOCK)), *quantize_wgrad(x_MD, group_sizes_G))


def quantize_wgrad(x_MD: jax.Array, group_sizes_G: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x in 128x1 tiles along tokens counted from each group's first row: (q_DP fp8, scale_DT)."""
    return quantize_blocks(_pad_groups(x_MD, group_sizes_G).T, (1, BLOCK))


def _per_column(scale_GJL: jax.Array, n: int) -> jax.Array:
    """128x128 block scales [G, J, ceil(n/128)] -> one scale per chunk and column [G, J, n]."""
    return jnp.repeat(scale_GJL, BLOCK, axis=2)[:, :, :n]


# ---- the two grouped GEMMs: where the kernels plug in ------------------------------------------

def _m_grouped(qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G, backend: str, out_dtype,
               covered: bool = False) -> jax.Array:
    """y [M, N] (out_dtype) = a[rows of g] @ b[g]^T per group, scales sa per row and chunk, sb per
    chunk and column (constant over 128-column blocks); zero outside the groups unless `covered`
    (gmm_block) lets the kernel leave them. b is K-major."""
    if backend == "pallas_gpu":
        _check_gpu(backend)
        from dsjax.fp8 import grouped_kernel

        reason = grouped_kernel.m_grouped_unfit_reason(qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G)
        if reason is None:
            return grouped_kernel.m_grouped_matmul(qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G, out_dtype,
                                                   sb_blocked=True, covered=covered)
        warn_once(log, ("m_grouped", reason, qa_MK.shape, qb_GNK.shape),
                   f"kernel_backend='pallas_gpu' cannot take the FP8 grouped GEMM {qa_MK.shape} @ "
                   f"{qb_GNK.shape}^T: {reason}; using the XLA ragged_dot path")
    K = qa_MK.shape[1]
    a_MK = dequantize_blocks(qa_MK, sa_MJ, (1, BLOCK))
    # rows past the groups may hold anything (the fused quantization leaves them unwritten): zeroed,
    # so that no lowering of ragged_dot (masked products, on GPU a dense one) can meet a NaN there
    a_MK = jnp.where((jnp.arange(a_MK.shape[0]) < group_sizes_G.sum())[:, None], a_MK, 0.0)
    b_GKN = qb_GNK.astype(jnp.float32).transpose(0, 2, 1) * jnp.repeat(sb_GJN, BLOCK, axis=1)[:, :K]
    y_MN = lax.ragged_dot(a_MK, b_GKN, group_sizes_G, precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    return y_MN.astype(out_dtype)


def _k_grouped(qa_KP, sa_KT, qb_NP, sb_NT, group_sizes_G, backend: str, out_dtype) -> jax.Array:
    """dw [G, K, N] (out_dtype) = sum over group g's 128-row tiles of a-tile @ b-tile^T, operands in
    wgrad's layout (`quantize_wgrad`), scales per tile and row of a / of b."""
    if backend == "pallas_gpu":
        _check_gpu(backend)
        from dsjax.fp8 import grouped_kernel

        _, tile_start_G, tiles_G = group_tiles(group_sizes_G, 0)
        reason = grouped_kernel.k_grouped_unfit_reason(qa_KP, sa_KT, qb_NP, sb_NT, tiles_G)
        if reason is None:
            return grouped_kernel.k_grouped_matmul(qa_KP, sa_KT, qb_NP, sb_NT, tile_start_G, tiles_G, out_dtype)
        warn_once(log, ("k_grouped", reason, qa_KP.shape, qb_NP.shape),
                   f"kernel_backend='pallas_gpu' cannot take the FP8 grouped weight-gradient GEMM "
                   f"{qa_KP.shape} x {qb_NP.shape}: {reason}; using the XLA ragged_dot path")
    a_KP = dequantize_blocks(qa_KP, sa_KT, (1, BLOCK))
    b_NP = dequantize_blocks(qb_NP, sb_NT, (1, BLOCK))
    dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (1,)), ((), ())),
                                         lhs_ragged_dimensions=[1], rhs_group_dimensions=[])
    padded_sizes_G = (group_sizes_G + BLOCK - 1) // BLOCK * BLOCK  # the padded layout's segments
    dw_GKN = lax.ragged_dot_general(a_KP, b_NP, padded_sizes_G, dims, precision=lax.Precision.HIGHEST,
                                    preferred_element_type=jnp.float32)
    return dw_GKN.astype(out_dtype)


# ---- custom_vjp ---------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _gmm(x_MK, ws_GKN, blocks, group_sizes_G, backend, out_dtype, x_dtype, w_dtype, covered, widths):
    return _gmm_fwd(x_MK, ws_GKN, blocks, group_sizes_G, backend, out_dtype, x_dtype, w_dtype, covered, widths)[0]


def _gmm_fwd(x_MK, ws_GKN, blocks, group_sizes_G, backend, out_dtype, x_dtype, w_dtype, covered, widths):
    """ws_GKN: a tuple of weights [G, K, N_i] (N_i = widths[i]), used as their concatenation along N;
    blocks: their WeightBlocks made earlier, or None to make them here."""
    del x_dtype, w_dtype, widths
    qx_MK, sx_MJ, qxt_KP, sxt_KT = quantize_activation(x_MK, group_sizes_G, backend)
    made_here = blocks is None
    if made_here:
        blocks = weight_blocks(ws_GKN, backend)  # both orientations from one read
    qw_GKN, qwt_GNK, sw_GJL = blocks
    y_MN = _m_grouped(qx_MK, sx_MJ, qwt_GNK, _per_column(sw_GJL, qw_GKN.shape[2]), group_sizes_G, backend,
                      out_dtype, covered)
    # the backward's operands, made here once (see remat_names.FP8_OPERANDS): wgrad's tiles of x, dgrad's w.
    # Blocks made by the caller stay unnamed: a layer scan then forwards them to the backward as the
    # scanned input they are, where a named (saved) residual would be copied into a stacked buffer.
    qxt_KP, sxt_KT = saved((qxt_KP, sxt_KT), FP8_OPERANDS)
    if made_here:
        qw_GKN, sw_GJL = saved((qw_GKN, sw_GJL), FP8_OPERANDS)
    return y_MN, (qxt_KP, sxt_KT, qw_GKN, sw_GJL, group_sizes_G)


def _gmm_bwd(backend, out_dtype, x_dtype, w_dtype, covered, widths, res, dy_MN):
    del out_dtype
    qxt_KP, sxt_KT, qw_GKN, sw_GJL, group_sizes_G = res
    K = qw_GKN.shape[1]
    qdy_MN, sdy_ML, qdyt_NP, sdyt_NT = quantize_activation(dy_MN, group_sizes_G, backend)
    # dgrad's b is w[g]^T [N, K]; K-major that is w[g] itself.
    dx_MK = _m_grouped(qdy_MN, sdy_ML, qw_GKN, _per_column(sw_GJL.transpose(0, 2, 1), K), group_sizes_G,
                       backend, x_dtype, covered)
    dw_GKN = _k_grouped(qxt_KP, sxt_KT, qdyt_NP, sdyt_NT, group_sizes_G, backend, w_dtype)
    ends = np.cumsum(widths)
    return dx_MK, tuple(dw_GKN[:, :, end - width:end] for end, width in zip(ends, widths)), None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_block(x_MK: jax.Array, w_GKN, group_sizes_G: jax.Array, backend: str = "xla_cpu",
              out_dtype=None, covered: bool = False, blocks: Optional[WeightBlocks] = None):
    """y [M, N] in out_dtype (default x.dtype): FP8 block-scaled grouped GEMM, zero past the groups.

    x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] (int, sum <= M). Differentiable in x
    and w (dx in x.dtype, dw in w.dtype) with DeepSeek-V3's FP8 recipe for all three GEMMs.
    w may also be a tuple of weights [G, K, N_i] (one dtype), used as their concatenation along N
    without materializing it (the experts' gate and up projections as one GEMM; their gradients
    come back as a tuple). `covered`: as in grouped_gemm.gmm — every row is in a group, or the
    caller never reads the rows past the groups — which lets the Pallas kernels skip zeroing them
    (a select over y and over dx); those rows then hold garbage. `blocks`: w's WeightBlocks
    (`quantize_kernel.weight_blocks`), made by the caller once for many calls (before a layer scan,
    dsjax.model.fp8_weights); then w's values are never read, only its shape and dtype (dw's), and
    the blocks get no gradient.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend {backend!r} is not one of {BACKENDS}")
    ws_GKN = w_GKN if isinstance(w_GKN, tuple) else (w_GKN,)
    shapes = [w.shape for w in ws_GKN]
    if (x_MK.ndim != 2 or x_MK.shape[0] == 0 or not ws_GKN
            or any(len(sh) != 3 or sh[:2] != (group_sizes_G.shape[0], x_MK.shape[1]) for sh in shapes)
            or group_sizes_G.shape != (shapes[0][0],) or len({w.dtype for w in ws_GKN}) != 1):
        raise ValueError(f"gmm_block needs x [M>0, K], w [G, K, N] (or a tuple of [G, K, N_i] of one dtype), "
                         f"group_sizes [G]; got x {x_MK.shape}, w {shapes}, group_sizes {group_sizes_G.shape}")
    if blocks is not None:
        g, k, n = shapes[0][0], shapes[0][1], sum(sh[2] for sh in shapes)
        want = ((g, k, n), (g, n, k), (g, -(-k // BLOCK), -(-n // BLOCK)))
        if tuple(tuple(b.shape) for b in blocks) != want:
            raise ValueError(f"gmm_block: blocks {[tuple(b.shape) for b in blocks]} are not the 128x128 "
                             f"blocks of w {shapes} (want q, q^T, scales of shapes {list(want)})")
        # no stop_gradient here (the custom VJP gives them none): its primitive would turn the scanned-in
        # blocks into a new value, which a layer scan then stacks as a residual instead of forwarding
    if backend == "pallas_gpu":
        _check_gpu(backend)
    out_dtype = jnp.dtype(x_MK.dtype if out_dtype is None else out_dtype)
    return _gmm(x_MK, ws_GKN, blocks, group_sizes_G.astype(jnp.int32), backend, out_dtype, jnp.dtype(x_MK.dtype),
                jnp.dtype(ws_GKN[0].dtype), covered, tuple(sh[2] for sh in shapes))

"""Grouped GEMM: y[rows of group g] = x[rows of group g] @ w[g], over contiguous row groups.

    gmm(x_MK, w_GKN, group_sizes_G, kind) -> y_MN

The routed experts' three GEMMs (DeepSeek-V3 §2.1.2) after tokens are sorted by expert. Rows past
sum(group_sizes) belong to no group and come back as zeros (expert parallelism feeds fixed
worst-case buffers whose tail is empty).

Backends (config.moe.grouped_gemm, never chosen by probing the platform):
- "xla": jax.lax.ragged_dot — the reference and the CPU/TPU path. On H200 XLA densifies it
  (~24 TFLOP/s, research/performance-anchors.md J1).
- "pallas_mgpu": Pallas Mosaic GPU Hopper kernels under one jax.custom_vjp (such kernels have no
  VJP of their own):
      forward       y  = x @ w[g]        per group       (M-grouped)
      input grad    dx = dy @ w[g]^T     w read K-major, no copy (M-grouped)
      weight grad   dw = x[g]^T @ dy[g]  contraction over each group's rows (K-grouped)
  Each product runs grouped_gemm_kernel.py's warp-specialized kernel (a memory warpgroup and two
  compute warpgroups per CTA, 128x256 or 256x128 tiles) when the dimension its warpgroups split is
  a multiple of 256 (the output width N for the M-grouped kernels, dw's K for the K-grouped one):
  at V3's expert shapes they run 1.5-1.9x the one-warpgroup kernels' forward and input grad and
  1.2x their weight grad (BENCHMARKS.md, issue 7).
  Otherwise it runs the one-warpgroup kernels: ragged_dot_mgpu's M-grouped kernel, forked here
  with one change (a tile that holds no row of any group skips its K loop, so an expert-parallel
  buffer sized for the worst case costs only the rows it holds), and jax's
  transposed_ragged_dot_mgpu. No kernel writes a row outside the groups: with `covered=False` the
  forward output and dx are masked there with a select (NaN-safe); `covered=True` skips both
  passes, for callers whose groups hold every row (dropless single-device dispatch) or that never
  read the rows past them (dispatch.ffn_grouped's past_groups="unread", for expert_parallel's
  padding pairs). dy needs no mask: both backward kernels read only the groups' rows, and the
  weight-gradient kernels zero a neighbouring group's rows by multiplying (x must be finite there).
  Operands must be bf16/f16 with K and N multiples of 128; M is padded to the row block. Anything
  else falls back to "xla" with one warning per shape. Kernel outputs are in the operand dtype
  (f32 accumulation inside), so with this backend the weight gradient is rounded to bf16 before
  the optimizer sees it.

GPU-only modules are imported inside the kernel functions, so importing dsjax works everywhere.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dsjax.fallbacks import warn_once

log = logging.getLogger(__name__)

KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
ALIGN = 128  # K and N must be multiples of this; M is padded to it


class Blocks(NamedTuple):
    """One kernel's tiling: output tile m x n, contraction step k, pipeline stages, and how many
    n-tiles a CTA walks before moving down m (the planar snake's band width)."""

    m: int = 128
    n: int = 128
    k: int = 64
    stages: int = 6
    grid_block_n: int = 4


# scripts/bench_gmm_blocks.py on one H200 (2026-11-29, configs/small.py's expert GEMMs, 98,304 rows
# over 64 experts): 128x128x64 tiles with 6 stages were best or within 4% of best for all three
# kernels — forward 546/505, input grad 520/529, weight grad 573/581 TFLOP/s (up/down projection;
# dense bf16 678/646); 4 stages lose 2-6%, 64-row or 64-column tiles 25-35%.
FORWARD_BLOCKS = INPUT_GRAD_BLOCKS = WEIGHT_GRAD_BLOCKS = Blocks()


class Kernels(NamedTuple):
    """The three grouped products the custom VJP needs; rows outside every group may be garbage."""

    forward: Callable  # (x_MK, w_GKN, group_sizes_G) -> [M, N]
    input_grad: Callable  # (dy_MN, w_GKN, group_sizes_G) -> [M, K]
    weight_grad: Callable  # (x_MK, dy_MN, group_sizes_G) -> [G, K, N]


def _row_mask(y, group_sizes_G):
    in_group_M = jnp.arange(y.shape[0]) < group_sizes_G.sum()
    return jnp.where(in_group_M[:, None], y, jnp.zeros((), y.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped(x_MK, w_GKN, group_sizes_G, kernels: Kernels, covered: bool):
    """y [M, N] (operand dtype) through `kernels`; rows outside the groups are zeroed unless the
    caller promises there are none or that it never reads them (`covered`)."""
    y_MN = kernels.forward(x_MK, w_GKN, group_sizes_G)
    return y_MN if covered else _row_mask(y_MN, group_sizes_G)


def _grouped_fwd(x_MK, w_GKN, group_sizes_G, kernels, covered):
    return grouped(x_MK, w_GKN, group_sizes_G, kernels, covered), (x_MK, w_GKN, group_sizes_G)


def _grouped_bwd(kernels, covered, res, dy_MN):
    x_MK, w_GKN, group_sizes_G = res
    dy_MN = dy_MN.astype(x_MK.dtype)
    dx_MK = kernels.input_grad(dy_MN, w_GKN, group_sizes_G)
    dx_MK = dx_MK if covered else _row_mask(dx_MK, group_sizes_G)
    dw_GKN = kernels.weight_grad(x_MK, dy_MN, group_sizes_G)
    return dx_MK.astype(x_MK.dtype), dw_GKN.astype(w_GKN.dtype), None


grouped.defvjp(_grouped_fwd, _grouped_bwd, optimize_remat=True)


# ------------------------------------------------------------------------------- Pallas MGPU


def _ragged_dot_mgpu(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool = False, blocks: Blocks = Blocks()):
    """ragged_dot_mgpu.ragged_dot (jax 0.11, Apache-2.0, the JAX Authors) with empty tiles skipped.

    rhs is [G, K, N], or [G, N, K] with transpose_rhs. Output [M, N] in lhs.dtype.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import GroupInfo

    m, k = lhs_MK.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    block_m, block_n, block_k = blocks.m, blocks.n, blocks.k

    def body(rows_per_expert_gmem, lhs_gmem, rhs_gmem, o_gmem):
        grid_m = pl.cdiv(m, block_m) + g - 1
        grid_n = pl.cdiv(n, block_n)

        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def mn_loop(loop_info):
            mi, ni = plgpu.planar_snake(loop_info.index[0], (grid_m, grid_n), 1, blocks.grid_block_n)
            group_info = GroupInfo.create(rows_per_expert_gmem, block_m, mi)

            def acc_scope(acc_ref):
                @pl.when(group_info.actual_size > 0)  # the one change: skip tiles with no rows
                def _():
                    plgpu.emit_pipeline(
                        lambda _, lhs_smem, rhs_smem: plgpu.wgmma(
                            acc_ref, lhs_smem, rhs_smem.transpose((1, 0)) if transpose_rhs else rhs_smem),
                        grid=(k // block_k,),
                        in_specs=[
                            plgpu.BlockSpec((block_m, block_k), lambda kk: (group_info.block, kk), delay_release=1),
                            plgpu.BlockSpec((block_n, block_k) if transpose_rhs else (block_k, block_n),
                                            lambda kk: (ni, kk) if transpose_rhs else (kk, ni), delay_release=1),
                        ],
                        max_concurrent_steps=blocks.stages,
                    )(lhs_gmem, rhs_gmem.at[group_info.group_id])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), dtype=o_gmem.dtype))
            def store_scope(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                # Stores of 2^i rows (a static ladder of TMA shapes) cover the group's rows in this tile.
                smem_start = group_info.start_within_block
                remaining_rows = min(block_m, m)
                while remaining_rows > 0:
                    const_rows_len = 1 << (remaining_rows.bit_length() - 1)
                    remaining_rows //= 2

                    @pl.when(group_info.actual_size & const_rows_len != 0)
                    def _():
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[pl.ds(smem_start, const_rows_len)],
                            o_gmem.at[pl.ds(group_info.block_start + smem_start, const_rows_len),
                                      pl.ds(ni * block_n, block_n)])

                    smem_start += group_info.actual_size & const_rows_len
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), lhs_MK.dtype),
        grid=(jax.devices()[0].core_count,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(group_sizes_G, lhs_MK, rhs)


def _warp_specialized_fits(width: int) -> bool:
    """Whether grouped_gemm_kernel's two warpgroups can split `width` (the output's N for the
    M-grouped kernels, dw's K for the K-grouped one) into their 128-wide slices (M_GROUPED's
    tile_n, K_GROUPED's tile_m). small.py's expert width 1408 cannot: there the one-warpgroup
    kernels run, which measured as fast as 64-wide warp-specialized slices or faster. An explicit
    `blocks` (scripts/bench_gmm_blocks.py) pins the one-warpgroup kernels."""
    return width % 256 == 0


def _mgpu_forward(x_MK, w_GKN, group_sizes_G, blocks: Blocks = None):
    if blocks is None and _warp_specialized_fits(w_GKN.shape[2]):
        from dsjax.model import grouped_gemm_kernel as gk

        return gk.m_grouped(x_MK, w_GKN, group_sizes_G, transpose_rhs=False)
    return _ragged_dot_mgpu(x_MK, w_GKN, group_sizes_G, blocks=blocks or FORWARD_BLOCKS)


def _mgpu_input_grad(dy_MN, w_GKN, group_sizes_G, blocks: Blocks = None):
    if blocks is None and _warp_specialized_fits(w_GKN.shape[1]):
        from dsjax.model import grouped_gemm_kernel as gk

        return gk.m_grouped(dy_MN, w_GKN, group_sizes_G, transpose_rhs=True)
    return _ragged_dot_mgpu(dy_MN, w_GKN, group_sizes_G, transpose_rhs=True, blocks=blocks or INPUT_GRAD_BLOCKS)


def _mgpu_weight_grad(x_MK, dy_MN, group_sizes_G, blocks: Blocks = None):
    if blocks is None and _warp_specialized_fits(x_MK.shape[1]):
        from dsjax.model import grouped_gemm_kernel as gk

        return gk.k_grouped(x_MK, dy_MN, group_sizes_G)
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    b = blocks or WEIGHT_GRAD_BLOCKS
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x_MK, dy_MN, group_sizes=group_sizes_G, block_m=b.m, block_n=b.n, block_k=b.k,
        max_concurrent_steps=b.stages, grid_block_n=b.grid_block_n)


MGPU = Kernels(_mgpu_forward, _mgpu_input_grad, _mgpu_weight_grad)


def mgpu_unfit_reason(x_MK, w_GKN) -> str | None:
    """Why the Pallas kernels cannot take these operands, or None when they can."""
    k, n = w_GKN.shape[1:]
    if x_MK.dtype != w_GKN.dtype or x_MK.dtype not in KERNEL_DTYPES:
        return f"operands {x_MK.dtype}/{w_GKN.dtype} (the kernels take bf16 or f16, both the same)"
    if k % ALIGN or n % ALIGN:  # K and N are each an output width once (forward, input grad)
        return f"K={k}, N={n} (both must be multiples of {ALIGN})"
    return None



def gmm(x_MK, w_GKN, group_sizes_G, kind: str = "xla", out_dtype=jnp.float32, covered: bool = False):
    """Grouped GEMM of `kind` ("xla" | "pallas_mgpu"): y [M, N] in out_dtype, zero outside the groups.

    `covered`: the caller guarantees that every row is in a group, or that it never reads the rows
    past the groups (nor lets their gradients reach anything), which lets the Pallas path skip its
    row masks: those rows (of y and of dx) then hold garbage."""
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    if kind == "pallas_mgpu":
        reason = mgpu_unfit_reason(x_MK, w_GKN)
        if reason is None:
            m = x_MK.shape[0]
            pad = -m % ALIGN  # padded rows lie outside the groups; sliced off below, zero dy in backward
            x_pad = jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK
            y_MN = grouped(x_pad, w_GKN, group_sizes_G, MGPU, covered)
            return (y_MN[:m] if pad else y_MN).astype(out_dtype)
        warn_once(log, (reason, x_MK.shape, w_GKN.shape),
                   f"grouped_gemm='pallas_mgpu' cannot take x{x_MK.shape} @ w{w_GKN.shape}: {reason}; "
                   "using jax.lax.ragged_dot")
    elif kind != "xla":
        raise ValueError(f"config field 'model.moe.grouped_gemm': unknown kind {kind!r}")
    return jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G, preferred_element_type=out_dtype)

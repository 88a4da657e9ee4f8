"""Warp-specialized bf16 grouped GEMMs for Hopper (Pallas Mosaic GPU): the routed experts' GEMMs.

    m_grouped(lhs_MK, rhs, group_sizes_G, transpose_rhs, tiles) -> [M, N]
        y[rows of g] = lhs[rows of g] @ rhs[g]      rhs [G, K, N], or [G, N, K] read transposed
    k_grouped(x_MK, dy_MN, group_sizes_G, tiles) -> dw [G, K, N]
        dw[g] = x[rows of g]^T @ dy[rows of g]

The forward and input gradient (M-grouped) and the weight gradient (K-grouped: the contraction
runs over each group's rows) of grouped_gemm.py's custom VJP, for DeepSeek-V3's fine-grained
experts (§2.1.2) at their real shapes: at V3's ~512 rows per expert no expert's weights stay in
L2, so a kernel must do more work per byte it loads than one warpgroup on a 128x128 tile can.

How it runs (jax's hopper_matmul_mgpu.py is the template for the structure, ragged_dot_mgpu.py and
transposed_ragged_dot_mgpu.py for the grouping; one CTA per SM, persistent over output tiles in a
planar snake):
- a memory warpgroup streams the operand tiles of each K step (tile_k deep) through `stages`
  shared-memory buffers by TMA; two compute warpgroups each WGMMA a tile_m x tile_n slice of the
  CTA tile into their own f32 accumulator, so the tensor cores always have a WGMMA queued, and
  each stores its slice through shared memory while the memory warpgroup already loads the next
  tile's operands;
- M-grouped: the two warpgroups sit side by side along N (CTA tile tile_m x 2 tile_n), so row tiles
  stay tile_m tall and few straddle a group boundary. Tiles come from group_tiles.m_tile_schedule:
  a tile holding rows of several groups is computed once per group, with that group's weights, and
  each pass stores only its group's rows (a ladder of 2^i-row TMA stores: static shapes, dynamic
  offsets, from an unswizzled output tile). Tiles with no rows skip their K loop. No row outside
  the groups is written: those rows hold whatever the output buffer held (grouped_gemm.py masks
  them unless its caller promises not to read them);
- K-grouped: the warpgroups are stacked along dw's K (CTA tile 2 tile_m x tile_n), one output tile
  per group and tile position, and its pipeline runs over the tile_k-row blocks the group touches
  (a dynamic grid; an empty group runs no step and stores zeros). The first and last blocks may
  hold a neighbouring group's rows: each warpgroup zeroes those rows of its own slice of x in
  shared memory before its WGMMA, by multiplying (as transposed_ragged_dot_mgpu.py does), so x
  must hold no NaN or inf in rows it does not own (dispatch.ffn_grouped's "unread" contract).

Shapes: K, N (and dw's K) must be multiples of the tiles; M a multiple of tile_m (grouped_gemm.py
pads it). Outputs are in the operand dtype, f32 accumulation inside.

Deviation from jax's kernels: theirs use one warpgroup per tile with no warp specialization (M-
grouped, K-grouped); hopper_matmul_mgpu's warp-specialized structure is dense only.

Runs on Hopper GPUs (grouped_gemm.py imports this module lazily). Checked on CPU with jax 0.11 in
Pallas's Mosaic GPU interpreter against float32 per-group products, and lowered for "cuda" (also
under jax 0.10) in tests/test_grouped_gemm_kernel.py. On one H200 (2026-11-29, jax 0.11.2): equal
to the one-warpgroup kernels' outputs within bf16 rounding at V3's expert shapes, and 1.5-1.9x
their forward and input-grad TFLOP/s, 1.2x their weight grad (`scripts/bench.py gmm_blocks`;
BENCHMARKS.md, Grouped GEMM).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsjax.fp8.kernel import SMEM_LIMIT, SMEM_SLACK, num_sms, swizzle_transforms
from dsjax.group_tiles import m_tile_schedule, store_group_rows

NUM_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One compute warpgroup's output slice tile_m x tile_n, the K step tile_k, pipeline stages,
    the planar snake's band width (output tiles along N a CTA walks before moving down M), and how
    many WGMMAs a warpgroup leaves in flight when its step returns (their stages are released one
    step later)."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 3
    grid_tile_width: int = 8
    delay_release: int = 0

    def smem_bytes(self, itemsize: int = 2) -> int:
        """Shared memory: the stages (an lhs and an rhs tile each) + both warpgroups' output slices."""
        stage = (self.tile_m + NUM_COMPUTE_WGS * self.tile_n) * self.tile_k * itemsize
        return self.stages * stage + NUM_COMPUTE_WGS * self.tile_m * self.tile_n * itemsize + SMEM_SLACK

    def check(self):
        if self.tile_m % 64 or self.tile_n % 64 or self.tile_k % 64 or self.tile_n > 256:
            raise ValueError(f"{self}: WGMMA tiles need tile_m, tile_n, tile_k multiples of 64, tile_n <= 256")
        if self.tile_m & (self.tile_m - 1):
            raise ValueError(f"{self}: the grouped store ladder needs a power-of-two tile_m")
        if self.tile_m * self.tile_n > 128 * 128:
            raise ValueError(f"{self}: a {self.tile_m} x {self.tile_n} f32 accumulator per warpgroup "
                             "exceeds the register file")
        if self.delay_release not in (0, 1) or self.delay_release >= self.stages:
            raise ValueError(f"{self}: delay_release must be 0 or 1, and below stages")
        if self.smem_bytes() > SMEM_LIMIT:
            raise ValueError(f"{self} needs ~{self.smem_bytes()} B of shared memory (> {SMEM_LIMIT}); "
                             "use fewer stages")


DEFAULT = Tiles()
# scripts/bench.py gmm_blocks on one H200 (2026-11-29, V3's expert GEMMs: 131,072 rows over 256
# experts, 7168 <-> 2048): forward 536-566 TFLOP/s, input grad 533-564 with DEFAULT (an 8-tile
# snake band; 2 is within 3%); weight grad 509-510 with a 2-tile band vs 479-492 with 8. A 4th
# stage does not fit beside the output tiles; 64-row slices lose 10-30%; delay_release=1 is
# within noise for the forward and loses up to 9% for the input grad.
M_GROUPED = DEFAULT
K_GROUPED = Tiles(grid_tile_width=2)


def _launch(body, out_shape, dtype, interpret, num_ctas):
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(out_shape, dtype),
        grid=(num_ctas or num_sms(),),
        grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret} if interpret else {}),
    )


def _pipeline(step, compute_context, lhs_block, rhs_block, lhs_index, rhs_index, num_steps, tiles: Tiles,
              dtype):
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(num_steps,),
        memory_registers=40,
        in_specs=[plgpu.BlockSpec(block, index, transforms=swizzle_transforms(tiles.tile_k, dtype),
                                  delay_release=tiles.delay_release)
                  for block, index in ((lhs_block, lhs_index), (rhs_block, rhs_index))],
        wg_axis="wg",
        num_compute_wgs=NUM_COMPUTE_WGS,
        max_concurrent_steps=tiles.stages,
        compute_context=compute_context,
    )


# ---- M-grouped: forward and input gradient ------------------------------------------------------

def m_grouped(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool = False, tiles: Tiles = M_GROUPED, *,
              interpret=None, num_ctas: int | None = None):
    """[M, N] in lhs's dtype: rows of group g times rhs[g] ([G, K, N], or [G, N, K] when
    transpose_rhs). Rows outside the groups are not written. M % tile_m == K % tile_k ==
    N % (2 tile_n) == 0."""
    tiles.check()
    m, k = lhs_MK.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tn, tk = tiles.tile_m, tiles.tile_n, tiles.tile_k
    cta_n = NUM_COMPUTE_WGS * tn
    if m % tm or k % tk or n % cta_n:
        raise ValueError(f"m_grouped: M={m}, K={k}, N={n} must be multiples of {tm}, {tk}, {cta_n}")
    sched_4S = m_tile_schedule(group_sizes_G.astype(jnp.int32), m, tm)
    m_tiles, n_tiles, k_steps = sched_4S.shape[1], n // cta_n, k // tk
    dtype = lhs_MK.dtype
    if transpose_rhs:
        rhs_block, rhs_index = (cta_n, tk), lambda kk: (0, kk)
    else:
        rhs_block, rhs_index = (tk, cta_n), lambda kk: (kk, 0)

    def step(_, lhs_smem, rhs_smem, acc_ref):
        cols = pl.ds(lax.axis_index("wg") * tn, tn)
        rhs_wg = rhs_smem.at[cols].transpose((1, 0)) if transpose_rhs else rhs_smem.at[:, cols]
        plgpu.wgmma(acc_ref, lhs_smem, rhs_wg)
        plgpu.wgmma_wait(tiles.delay_release)  # a stage is released delay_release steps after it returns
        return acc_ref

    def pipeline(step_fn, compute_context):
        return _pipeline(step_fn, compute_context, (tm, tk), rhs_block, lambda kk: (0, kk), rhs_index,
                         k_steps, tiles, dtype)

    ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body

    def body(sched_gmem, lhs_gmem, rhs_gmem, out_gmem):
        allocs = pipeline(ignore, ignore).get_allocations(lhs_gmem, rhs_gmem.at[0])

        # Unswizzled output slices: the store ladder starts at any row.
        @functools.partial(pl.run_scoped, pipeline_allocs=allocs,
                           out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, tm, tn), dtype), collective_axes="wg")
        def _scope(pipeline_allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
            def _tile_loop(loop_info):
                (lin,) = loop_info.index
                ti, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, tiles.grid_tile_width)
                group, block, first, rows = (sched_gmem[i, ti] for i in range(4))
                out_cols = pl.ds(ni * cta_n + wg * tn, tn)

                def compute_context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                    def _acc_scope(acc_ref):
                        run_pipeline(acc_ref)
                        y = acc_ref[...].astype(dtype)
                        o_smem = out_smem.at[wg]
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores read it
                        o_smem[...] = y
                        plgpu.commit_smem()
                        store_group_rows(o_smem, out_gmem, first, rows, tm, block * tm, out_cols)

                @pl.when(rows > 0)
                def _run():
                    rhs_g = rhs_gmem.at[group]
                    pipeline(step, compute_context)(
                        lhs_gmem.at[pl.ds(block * tm, tm), :],
                        rhs_g.at[pl.ds(ni * cta_n, cta_n), :] if transpose_rhs else rhs_g.at[:, pl.ds(ni * cta_n, cta_n)],
                        allocations=pipeline_allocs)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before out_smem goes out of scope

    return _launch(body, (m, n), dtype, interpret, num_ctas)(sched_4S, lhs_MK, rhs)


# ---- K-grouped: weight gradient -----------------------------------------------------------------

def k_grouped(x_MK, dy_MN, group_sizes_G, tiles: Tiles = K_GROUPED, *, interpret=None,
              num_ctas: int | None = None):
    """dw [G, K, N] in x's dtype: dw[g] = x[rows of g]^T @ dy[rows of g]; zeros for an empty group.
    x must be finite in every row a group's first or last tile_k block shares with another group.
    M % tile_k == K % (2 tile_m) == N % tile_n == 0."""
    tiles.check()
    if tiles.delay_release:  # its grid is dynamic and may have one step (Pallas's interpreter deadlocks)
        raise ValueError(f"k_grouped: {tiles} — the weight gradient's pipeline takes delay_release=0 only")
    m, k = x_MK.shape
    n = dy_MN.shape[1]
    g = group_sizes_G.shape[0]
    tm, tn, tk = tiles.tile_m, tiles.tile_n, tiles.tile_k
    cta_m = NUM_COMPUTE_WGS * tm
    if m % tk or k % cta_m or n % tn:
        raise ValueError(f"k_grouped: M={m}, K={k}, N={n} must be multiples of {tk}, {cta_m}, {tn}")
    sizes_G = group_sizes_G.astype(jnp.int32)
    end_G = jnp.cumsum(sizes_G)
    start_G = end_G - sizes_G
    first_G = start_G // tk
    steps_G = jnp.where(sizes_G > 0, (end_G + tk - 1) // tk - first_G, 0)
    groups_4G = jnp.stack([start_G, end_G, first_G, steps_G]).astype(jnp.int32)
    m_tiles, n_tiles = k // cta_m, n // tn
    dtype = x_MK.dtype

    def pipeline(step_fn, compute_context, num_steps, first):
        return _pipeline(step_fn, compute_context, (tk, cta_m), (tk, tn), lambda kk: (first + kk, 0),
                         lambda kk: (first + kk, 0), num_steps, tiles, dtype)

    ignore = lambda *_, **__: None  # noqa: E731

    def body(groups_gmem, x_gmem, dy_gmem, out_gmem):
        # A static grid of `stages` steps allocates what the dynamic grid below uses.
        allocs = pipeline(ignore, ignore, tiles.stages, 0).get_allocations(x_gmem, dy_gmem)

        @functools.partial(pl.run_scoped, pipeline_allocs=allocs,
                           out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, tm, tn), dtype, transforms=swizzle_transforms(tn, dtype)),
                           collective_axes="wg")
        def _scope(pipeline_allocs, out_smem):
            wg = lax.axis_index("wg")

            # Groups outermost: concurrent CTAs share one group's rows in L2.
            @plgpu.nd_loop((g, m_tiles * n_tiles), collective_axes="sm")
            def _tile_loop(loop_info):
                gi, lin = loop_info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, tiles.grid_tile_width)
                start, end, first, num_steps = (groups_gmem[i, gi] for i in range(4))

                def mask_rows(x_wg, row0):
                    """Zero the rows of x_wg [tk, tm] (global rows row0...) outside [start, end)."""
                    row = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (tk, tm), 0), plgpu.Layout.WGMMA)
                    row = row + row0
                    keep = ((row >= start) & (row < end)).astype(dtype)
                    x_wg[...] = x_wg[...] * keep
                    plgpu.commit_smem()

                def step(idx, x_smem, dy_smem, acc_ref):
                    (kk,) = idx
                    edge = (kk == 0) | (kk == num_steps - 1)
                    for w in range(NUM_COMPUTE_WGS):  # static slices: one masking branch per warpgroup
                        @pl.when(edge & (wg == w))
                        def _mask(w=w):
                            mask_rows(x_smem.at[:, pl.ds(w * tm, tm)], (first + kk) * tk)

                    plgpu.wgmma(acc_ref, x_smem.at[:, pl.ds(wg * tm, tm)].transpose((1, 0)), dy_smem)
                    plgpu.wgmma_wait(tiles.delay_release)
                    return acc_ref

                def compute_context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                    def _acc_scope(acc_ref):
                        run_pipeline(acc_ref)  # no step for an empty group: zeros
                        y = acc_ref[...].astype(dtype)
                        o_smem = out_smem.at[wg]
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        o_smem[...] = y
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            o_smem, out_gmem.at[gi, pl.ds(mi * cta_m + wg * tm, tm), pl.ds(ni * tn, tn)])

                pipeline(step, compute_context, num_steps, first)(
                    x_gmem.at[:, pl.ds(mi * cta_m, cta_m)], dy_gmem.at[:, pl.ds(ni * tn, tn)],
                    allocations=pipeline_allocs)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _launch(body, (g, k, n), dtype, interpret, num_ctas)(groups_4G, x_MK, dy_MN)

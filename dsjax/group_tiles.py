"""Which output tiles a grouped GEMM over contiguous row groups computes (DeepGEMM's "contiguous"
layout, as jax's ragged_dot_mgpu.py enumerates it).

    m_tile_schedule(group_sizes_G, m, tile_m) -> int32 [4, m/tile_m + G - 1]
    store_group_rows(o_smem, out_gmem, lo, count, height, row0, cols)   # in a Mosaic GPU kernel

Rows are sorted into contiguous groups (the routed experts' token-expert pairs, DeepSeek-V3
§2.1.2) and each group multiplies its own weight matrix. An M-grouped kernel (forward, input
gradient) walks row blocks of tile_m rows; a block that straddles a group boundary is computed
once per group it holds, with that group's weights, and each pass stores only its group's rows.
The schedule lists, per output tile, (group, row block, first row in the block, rows); it is
computed by XLA before the kernel call, so a tile reads four scalars instead of scanning all G
group sizes. Tiles with no rows (empty groups, the tail past sum(group_sizes)) list 0 rows and
the kernels skip them. Used by the bf16 kernels (model/grouped_gemm_kernel.py) and the FP8 ones
(fp8/grouped_kernel.py), which store a pass's rows with `store_group_rows`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def m_tile_schedule(group_sizes_G: jax.Array, m: int, tile_m: int) -> jax.Array:
    """int32 [4, m/tile_m + G - 1]: per output tile (group, row block, first row in the block, rows).

    Each nonempty group owns the row blocks it touches, in order; a block shared by k groups is
    listed k times. Unused trailing entries have 0 rows. `m` must be a multiple of tile_m.
    """
    num_groups = group_sizes_G.shape[0]
    num_sched = m // tile_m + num_groups - 1
    end_G = jnp.cumsum(group_sizes_G)
    start_G = end_G - group_sizes_G
    first_block_G = start_G // tile_m
    blocks_G = jnp.where(group_sizes_G > 0, (end_G + tile_m - 1) // tile_m - first_block_G, 0)
    sched_end_G = jnp.cumsum(blocks_G)
    t_S = jnp.arange(num_sched, dtype=jnp.int32)
    g_S = jnp.minimum(jnp.searchsorted(sched_end_G, t_S, side="right"), num_groups - 1).astype(jnp.int32)
    block_S = first_block_G[g_S] + t_S - (sched_end_G - blocks_G)[g_S]
    lo_S = jnp.maximum(start_G[g_S], block_S * tile_m)
    hi_S = jnp.minimum(end_G[g_S], (block_S + 1) * tile_m)
    rows_S = jnp.where(t_S < sched_end_G[-1], jnp.maximum(hi_S - lo_S, 0), 0)
    live_S = rows_S > 0
    return jnp.stack([g_S, jnp.where(live_S, block_S, 0), jnp.where(live_S, lo_S - block_S * tile_m, 0),
                      rows_S]).astype(jnp.int32)


def store_group_rows(o_smem, out_gmem, lo, count, height: int, row0, cols) -> None:
    """Inside a Pallas Mosaic GPU kernel: TMA-store rows [lo, lo + count) of the unswizzled shared-
    memory tile `o_smem` (`height` rows) to rows row0 + lo ... of `out_gmem` (columns `cols`), as a
    ladder of 2^i-row stores (static shapes, dynamic offsets), one per set bit of count. A pass over
    a tile shared by several groups writes only its own group's rows this way."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if height & (height - 1):
        raise ValueError(f"the grouped store ladder needs a power-of-two tile height (got {height})")
    size = height
    while size:
        @pl.when(count & size != 0)
        def _store(lo=lo, size=size):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(lo, size)], out_gmem.at[pl.ds(row0 + lo, size), cols])

        lo = lo + (count & size)
        size //= 2

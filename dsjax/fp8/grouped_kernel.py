"""Grouped block-scaled FP8 GEMMs for Hopper as Pallas Mosaic GPU kernels (DeepSeek-V3 §3.3, DeepGEMM).

    m_grouped_matmul(qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G, out_dtype) -> y [M, N]
        y[rows of g] = sum_j (qa[rows, chunk j] @ qb[g, :, chunk j]^T) * sa[rows, j] * sb[g, j, :]
    k_grouped_matmul(qa_KP, sa_KT, qb_NP, sb_NT, tile_start_G, tiles_G, out_dtype) -> dw [G, K, N]
        dw[g] = sum over g's tiles t (128 rows each) of (qa[:, t] @ qb[:, t]^T) * sa[:, t] * sb[:, t]^T

The routed experts' three GEMMs for grouped.py's custom_vjp: the M-grouped kernel serves forward
and dgrad (rows sorted into contiguous groups, one weight matrix per group), the K-grouped kernel
wgrad (the contraction runs over each group's rows, in the group-aligned 128-row tiles of
grouped.quantize_wgrad). Both are kernel.py's block-scaled GEMM (read that docstring first) with
a grouped iteration; they share its tile config, its per-step promotion (WGMMA a 128-K chunk into
a fresh accumulator, then acc += partial * sa[rows] * sb[cols] on the CUDA cores: §3.3.2's
promotion every 128 K) and its warp specialization (a memory warpgroup streaming fp8 tiles and
f32 scale vectors through `stages` shared-memory buffers by TMA, two compute warpgroups).

M-grouped (jax's ragged_dot_mgpu.py is the template for the grouping): output tiles of cta_m rows
are enumerated per group, so a tile that straddles a group boundary is computed once for each
group it holds (with that group's weights) and each pass stores only its group's rows, with a
ladder of 2^i-row TMA stores (static shapes, dynamic offsets) from an unswizzled output buffer
(any first row; its row stride of 256 bytes puts a WGMMA-layout store's 8 rows in the same banks).
A warpgroup slice whose rows all belong to the group (most slices) is stored whole from a second,
swizzled buffer (conflict-free), where that fits shared memory beside the stages: with bf16
outputs at the default 4 stages, not with float32. On one H200 (2026-11-29, session 10,
scripts/ab_fp8_grouped.py, three calls) V3's down forward with 512 rows per expert gained 5.5-8%
(651 -> 687 TFLOP/s in the last call); with Dirichlet-uneven loads (1,279 tile passes for 1,024
row tiles, 255 group boundaries inside tiles, so more slices take the ladder) V3's K = 2048
kernels moved -3.6 to +0.5%, -1.5% on average. The schedule (group, row block,
first row in the block, rows) per tile is computed by XLA before the call
(`group_tiles.m_tile_schedule`), so a tile reads four scalars instead of scanning all G group
sizes as GroupInfo does; tiles with no rows (empty groups, the tail past sum(group_sizes)) skip
their K loop. Rows past the groups are never written and are zeroed by the wrapper (a select,
NaN-safe). sb is per column [G, J, N] and constant over 128-column blocks (sb_blocked: one scalar
per step and chunk of columns, below).

K-grouped: one output tile [cta_m of K, cta_n of N] per group and tile position; its pipeline runs
over the group's tiles only (a dynamic grid starting at tile_start[g]; an empty group runs no step
and stores zeros). No tile crosses a group, so nothing is masked; sa and sb are per column on both
sides. Operands are tokens-contiguous ([K, P], [N, P]) because FP8 WGMMA takes K-major operands
only; grouped.py quantizes them straight into that layout.

Tiles: any Config that `check_config` admits (kernel.py's register estimate, cta_m, cta_n % 32 == 0
with Lane semantics, the stages that fit SMEM_LIMIT beside the output tile), e.g. 128 x 192 as two
64 x 192 warpgroups. A warpgroup whose accumulator and a full-width partial do not fit the
registers WGMMAs its tile as two column halves per step, each into a fresh partial promoted before
the next is issued (`_partial_n`: 128 x 256 as two 64 x 256 warpgroups, 2 x 64 x 128 each). A
partial is promoted in column chunks (`_col_chunk`): with sb_blocked one sb scalar per
gcd(128, partial width) columns (past 128 columns, or from a 96-column offset, a warpgroup's columns
span two scale blocks; no chunk does); with per-column sb (wgrad) the partial's whole column-scale
vector while its WGMMA runs where that fits the registers, else 32 columns' at a time after it.
On one H200 (2026-11-29, scripts/check_fp8_grouped.py --configs=sweep) 128 x 192 and 128 x 256 match
the reference but run slower than 128 x 128 on small.py's up GEMM (BENCHMARKS.md), so the defaults stay.

Two chunks per step (`Config.k_chunks=2`, M-grouped only; spec suffix ".k2", e.g.
128x128.m.2.4.lane.k2: two stages of two 128-K tiles per operand fill what four 128-K stages did;
each chunk is its own tile, in the same shape and swizzle as with one): a warpgroup issues both
chunks' WGMMAs into two partials, then promotes the first while the second still runs
(`wgmma_accumulator_load(wait_n=1)`; Pallas commits one WGMMA group per call). With one chunk per
step each promotion waits for its own WGMMA and both warpgroups reach it together, which may leave
the tensor cores idle through it: the suspect for the K = 2048 shapes (16 promotions per tile) where
every tiling stays at 1.13-1.25x bf16 (session 8). K pads to whole steps with zero chunks. Matches
the reference in the interpreter, lowers for CUDA, and on one H200 (2026-11-29, session 9) passes
every check of scripts/check_fp8_grouped.py but runs no faster: V3 K = 2048 forward / dgrad 574 /
561 TFLOP/s against one chunk's 582 / 600 (BENCHMARKS.md, FP8). So the promotion wait is not what
holds those shapes back; the default stays one chunk.

Chained tiles (`Config.chain`, M-grouped only; spec suffix ".c", e.g. 128x128.m.4.4.lane.c). Each
output tile runs its own warp-specialized K pipeline, and Pallas ends every pipeline with the
memory warpgroup waiting until the compute warpgroups have released its last stages: between two
tiles no load is in flight while the compute warpgroups store the finished tile and the memory
warpgroup reads the next tile's schedule, a bubble every K/128 steps, so it weighs 3.5x more at
V3's K = 2048 than at 7168 (the suspect for the M-grouped kernels' 1.13-1.17x there). Chained, a
CTA's pipelines run as one (Pallas's pipeline_state: START for its first tile with rows, STEADY
after, then a STOP pipeline on a dropped extra tile that drains the chain): the memory warpgroup
loads the next tile's first stages as the current tile's last steps release them. Pallas chains
only pipelines of whole rounds of the stages, so it applies where K/128 % stages == 0 (V3's 2048
and 7168 at 4 stages; not small.py's 1408, which runs unchained). Interpreter-exact, lowers for
CUDA (tests/test_fp8_grouped.py), and on one H200 (2026-11-29, scripts/check_fp8_grouped.py
--only=V3 --configs=128x128.m.4.4.lane,128x128.m.4.4.lane.c; every check passed): V3 down forward
590 -> 608 TFLOP/s, up/gate dgrad 587 -> 614, down dgrad 740 -> 762, up/gate forward 740 / 737.
The bubble was part of the K = 2048 gap, not all of it (down forward still 1.23x bf16). M_GROUPED
chains.

Shapes: K (forward) is zero-padded to whole 128-chunks, M to cta_m and N (and wgrad's K) to the
tile; outputs are sliced back. `*_unfit_reason` says what a kernel cannot take; grouped.py then
falls back to its XLA path with one warning per shape. group_sizes must sum to at most M.

GPU-only: imports Pallas Mosaic GPU at the top; grouped.py imports it lazily for "pallas_gpu".
Checked on CPU with jax 0.11.2 in Pallas's Mosaic GPU interpreter against grouped.py's reference,
in the default and wider tilings, and lowered for "cuda" (the default and SWEEP_CONFIGS;
tests/test_fp8_grouped.py, scripts/check_fp8_grouped.py --cpu-interpret); on one H200 (2026-11-29,
scripts/check_fp8_grouped.py), in the default tiling: forward, dgrad and wgrad match the
reference to 1.1-1.9e-4 relative; 537-792 TFLOP/s on small.py's and V3's expert shapes
(BENCHMARKS.md, FP8).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsjax.fp8.kernel import (BLOCK_K, FP8, MEMORY_REGISTERS, SMEM_LIMIT, Config, _fp8_transforms, _pad_to,
                              num_sms, swizzle_transforms)
from dsjax.group_tiles import m_tile_schedule, store_group_rows

# kernel.py's default: 128 x 128 CTA tile, two 64 x 128 math warpgroups along M, 4 stages; the
# M-grouped kernel's tiles chained (one H200, 2026-11-29: +3-5% at V3's K = 2048, equal at 7168),
# lowered with Warpgroup semantics, its snake bands as wide as the output (64 tiles: each row tile
# read once per pass over N). One H200, 2026-11-30, scripts/ab_fp8_grouped.py --dense (interleaved):
# +3-5% over Lane semantics with 4-tile bands on V3's four kernels at 256 experts, +6-9% at 4
# experts of ~8,192 rows; the configs/small.py step 208.3 / 207.7 vs 210.0 ms (BENCHMARKS.md).
M_GROUPED = Config(chain=True, semantics="warpgroup", grid_tile_width=64)
K_GROUPED = Config()
_LATE_COL_CHUNK = 32  # per-column sb loaded after the WGMMA: at most this many columns at a time
# Candidate tilings for the GPU sweep, as Config.parse specs (scripts/check_fp8_grouped.py
# --configs=sweep; tests/test_fp8_grouped.py lowers each for CUDA): the default and the dense
# kernel's best (kernel.BLOCKED) as the run's baselines, then wider CTA tiles, which load fewer
# bytes per FLOP (2 cta_m cta_n / (cta_m + cta_n): 128 at 128 x 128, 142 / 148 / 154 / 171 at
# 160 / 176 / 192 / 256 columns): 128 x 192 (two 64 x 192 warpgroups, 4 stages fit beside a bf16
# output tile), 128 x 256 (each warpgroup two 64 x 128 WGMMAs per step; 3 stages). 128 x 160
# (DeepGEMM's widest N) crashed on the GPU (check_config), so 128 x 176 (1408 = 8 x 176) was not tried.
SWEEP_CONFIGS = ("128x128.m.4.4.lane", "128x128.m.3.8.wg", "128x192.m.4.8.wg", "128x256.m.3.8.wg")


def _partial_n(cfg: Config, sb_blocked: bool) -> int:
    """Columns per WGMMA (and fresh partial): wg_n, or half of it where the accumulator and a
    full-width partial (with per-column sb, and 32 columns' scales) do not fit the registers
    (64 x 256: two 64 x 128 partials, 224 registers)."""
    def fits(partial_n):
        scale_columns = 0 if sb_blocked else math.gcd(_LATE_COL_CHUNK, partial_n)
        return cfg.registers(scale_columns, partial_n) <= cfg.compute_registers

    return cfg.wg_n // 2 if cfg.wg_n % 16 == 0 and not fits(cfg.wg_n) else cfg.wg_n


def _col_chunk(cfg: Config, sb_blocked: bool) -> int:
    """Columns promoted per sb read, within a partial of `_partial_n` columns. sb_blocked:
    gcd(128, partial_n), one sb scalar each: a partial's first column is a multiple of partial_n
    (CTA tiles start at multiples of cta_n, warpgroups and partials at multiples of their width,
    each dividing the one before), so no chunk straddles a 128-column scale block. Per-column sb:
    the partial's whole column-scale vector, loaded while the WGMMA runs, where it fits the
    registers beside the accumulators (64 x 128: 32 more), else gcd(32, partial_n) columns at a
    time (at most 8 registers), loaded after the WGMMA."""
    partial_n = _partial_n(cfg, sb_blocked)
    if sb_blocked:
        return math.gcd(BLOCK_K, partial_n)
    if cfg.registers(partial_n, partial_n) <= cfg.compute_registers:
        return partial_n
    return math.gcd(_LATE_COL_CHUNK, partial_n)


def check_config(cfg: Config, out_dtype, sb_blocked: bool):
    """Raises ValueError if the kernels cannot run `cfg` with this output dtype (shared memory) and
    sb (registers: per-column sb, as wgrad's, counts its column scales)."""
    cfg.check(0 if sb_blocked else _col_chunk(cfg, sb_blocked), _partial_n(cfg, sb_blocked))
    if cfg.k_chunks > 1 and not (sb_blocked and _partial_n(cfg, sb_blocked) == cfg.wg_n):
        what = "a column-halved warpgroup tile" if sb_blocked else "per-column sb (wgrad)"
        raise ValueError(f"{cfg}: k_chunks > 1 serves the M-grouped kernel with 128-column-blocked sb "
                         f"(forward, dgrad) and one WGMMA per chunk, not {what}")
    if cfg.cta_n % 64:
        # 128 x 160 (Warpgroup semantics) stopped an H200 with CUDA_ERROR_MISALIGNED_ADDRESS in its
        # first forward (2026-11-29, scripts/check_fp8_grouped.py --configs=sweep); the interpreter
        # accepts it. 128, 192 and 256 columns ran and matched the reference.
        raise ValueError(f"{cfg}: the grouped kernels need cta_n % 64 == 0 on the GPU (cta_n={cfg.cta_n})")
    if cfg.wg_m & (cfg.wg_m - 1):
        raise ValueError(f"{cfg}: the grouped store ladder needs a power-of-two warpgroup height")
    if (smem := cfg.smem_bytes(out_dtype)) > SMEM_LIMIT:
        raise ValueError(f"{cfg} with {jnp.dtype(out_dtype).name} output needs ~{smem} B of shared memory "
                         f"(> {SMEM_LIMIT}); use fewer stages")


def _swizzled_full_fits(cfg: Config, out_dtype) -> bool:
    """Whether the M-grouped kernel's second output buffer (swizzled, for the warpgroup slices whose
    rows all belong to the tile's group) fits shared memory beside the stages and the unswizzled one."""
    return cfg.smem_bytes(out_dtype) + cfg.cta_m * cfg.cta_n * jnp.dtype(out_dtype).itemsize <= SMEM_LIMIT


def _pipeline(cfg: Config, num_steps, step, compute_context, first=0, state=None):
    """kernel.py's warp-specialized K pipeline over `num_steps` steps of C = k_chunks 128-chunks,
    from step `first`. Per step: C tiles a [cta_m, 128] and C tiles b [cta_n, 128] (fp8, swizzled;
    each chunk its own tile, as with one chunk per step), then sa [C, cta_m] and sb [C, cta_n]. Call
    it (and get_allocations) with `_operands`. `state`: plgpu.PipelinePipeline when tiles chain
    (Config.chain), else None."""
    fp8_transforms = _fp8_transforms()
    c = cfg.k_chunks

    def tile(rows, i):  # chunk i of step kk: the 128-K block c (first + kk) + i
        return plgpu.BlockSpec((rows, BLOCK_K), lambda kk: (0, c * (first + kk) + i), transforms=fp8_transforms)

    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(num_steps,),
        memory_registers=MEMORY_REGISTERS,
        in_specs=[
            *(tile(cfg.cta_m, i) for i in range(c)),
            *(tile(cfg.cta_n, i) for i in range(c)),
            plgpu.BlockSpec((c, cfg.cta_m), lambda kk: (first + kk, 0)),
            plgpu.BlockSpec((c, cfg.cta_n), lambda kk: (first + kk, 0)),
        ],
        wg_axis="wg",
        num_compute_wgs=cfg.num_compute_wgs,
        max_concurrent_steps=cfg.stages,
        compute_context=compute_context,
        pipeline_state=state,
    )


def _operands(cfg: Config, a, b, sa, sb) -> tuple:
    """The pipeline's inputs: a and b once per chunk of a step (`_pipeline`'s in_specs)."""
    return (a,) * cfg.k_chunks + (b,) * cfg.k_chunks + (sa, sb)


def _promote_step(cfg: Config, wg_idx, sb_blocked: bool):
    """One pipeline step of a compute warpgroup: WGMMA its slice of the chunk into a fresh
    accumulator and promote it into the float32 carry, scaled by sa[rows] and sb[cols]: per partial
    of `_partial_n` columns (one WGMMA each, promoted before the next is issued) and within it per
    chunk of `_col_chunk` columns (one partial of one chunk for 64 x 128 warpgroups)."""
    split_m = cfg.wg_dim == "m"
    wg_m, wg_n = cfg.wg_m, cfg.wg_n
    wg_rows = pl.ds(wg_idx * wg_m, wg_m) if split_m else pl.ds(0, wg_m)
    wg_cols = pl.ds(0, wg_n) if split_m else pl.ds(wg_idx * wg_n, wg_n)
    partial_n, chunk = _partial_n(cfg, sb_blocked), _col_chunk(cfg, sb_blocked)
    early = sb_blocked or chunk == partial_n  # all of a partial's sb loads while its WGMMA runs

    def bcast(v, dim):
        return lax.broadcast_in_dim(v, (wg_m, chunk), [dim])

    def cols(x, start):  # `chunk` columns of a register array
        return lax.slice(x, (0, start), (wg_m, start + chunk)) if chunk < x.shape[1] else x

    def chunked_step(_, *refs):
        """k_chunks 128-K chunks per step (sb_blocked, one WGMMA per chunk): every chunk's WGMMA
        into its own partial first, then each partial promoted as soon as its WGMMA is done
        (wgmma_accumulator_load's wait_n), while the later chunks' WGMMAs still run."""
        c = cfg.k_chunks
        a_smems, b_smems, (sa_smem, sb_smem, acc) = refs[:c], refs[c:2 * c], refs[2 * c:]

        def products(*partial_refs):
            for ref, a_smem, b_smem in zip(partial_refs, a_smems, b_smems):
                a_wg = a_smem.at[wg_rows] if split_m else a_smem
                b_wg = b_smem if split_m else b_smem.at[wg_cols]
                plgpu.wgmma(ref, a_wg, b_wg.transpose((1, 0)))
            scales = [plgpu.load(sa_smem.at[i, wg_rows], layout=plgpu.Layout.WGMMA.reduce(1))
                      * sb_smem[i, wg_cols.start] for i in range(c)]
            out = acc
            for i, ref in enumerate(partial_refs):
                partial = plgpu.wgmma_accumulator_load(ref, wait_n=c - 1 - i)
                out = out + partial * lax.broadcast_in_dim(scales[i], (wg_m, wg_n), [0])
            return out

        return pl.run_scoped(products, *[plgpu.ACC((wg_m, wg_n), jnp.float32) for _ in range(c)])

    def step(_, a_smem, b_smem, sa_smem, sb_smem, acc):
        a_wg = a_smem.at[wg_rows] if split_m else a_smem
        b_wg = b_smem if split_m else b_smem.at[wg_cols]

        def load_sb(start):  # one scalar (sb_blocked) or `chunk` columns' scales from column `start`
            if sb_blocked:
                return sb_smem[0, wg_cols.start + start]
            return plgpu.load(sb_smem.at[0, pl.ds(wg_cols.start + start, chunk)],
                              layout=plgpu.Layout.WGMMA.reduce(0))

        def partial_product(partial_ref, first, sa):
            b_part = b_wg if partial_n == wg_n else b_wg.at[pl.ds(first, partial_n)]
            plgpu.wgmma(partial_ref, a_wg, b_part.transpose((1, 0)))
            # The scales load while the WGMMA runs; reading the accumulator then waits for it.
            if sa is None:
                sa = plgpu.load(sa_smem.at[0, wg_rows], layout=plgpu.Layout.WGMMA.reduce(1))
            chunk_starts = range(first, first + partial_n, chunk)
            if sb_blocked:  # sa * sb per chunk: one FMA per element below (DeepGEMM's promotion)
                scales = [sa * load_sb(c) for c in chunk_starts]
            else:
                scales = [load_sb(c) for c in chunk_starts] if early else None
            return partial_ref[...], sa, scales

        sa, sums = None, []  # sums: acc + scaled partial, chunk by chunk
        for first in range(0, wg_n, partial_n):
            partial, sa, scales = pl.run_scoped(functools.partial(partial_product, first=first, sa=sa),
                                                plgpu.ACC((wg_m, partial_n), jnp.float32))
            for i, c in enumerate(range(0, partial_n, chunk)):
                if sb_blocked:
                    scaled = cols(partial, c) * bcast(scales[i], 0)
                else:  # wgrad: per-column sb, a multiply more
                    sb = scales[i] if early else load_sb(first + c)
                    scaled = cols(partial, c) * bcast(sa, 0) * bcast(sb, 1)
                sums.append(cols(acc, first + c) + scaled)
        return lax.concatenate(sums, 1) if len(sums) > 1 else sums[0]

    return chunked_step if cfg.k_chunks > 1 else step


def _zero_acc(cfg: Config):
    return plgpu.layout_cast(jnp.zeros((cfg.wg_m, cfg.wg_n), jnp.float32), plgpu.Layout.WGMMA)


def _launch(body, out_shape, out_dtype, cfg: Config, interpret, num_ctas):
    semantics = (plgpu.LoweringSemantics.Lane if cfg.semantics == "lane"
                 else plgpu.LoweringSemantics.Warpgroup)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(num_ctas or num_sms(),),
        grid_names=("sm",),
        num_threads=cfg.num_compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=semantics),
        **({"interpret": interpret} if interpret else {}),
    )


# ---- M-grouped: forward and dgrad ---------------------------------------------------------------

def _m_grouped_call(sched_4S, a_MK, b_GNK, saT_JM, sb_GJN, out_dtype, cfg: Config, sb_blocked: bool,
                    interpret, num_ctas):
    """The kernel on aligned operands: M % cta_m == N % cta_n == K % (128 k_chunks) == 0."""
    m, k = a_MK.shape
    n = b_GNK.shape[1]
    cta_m, cta_n, wg_m, wg_n = cfg.cta_m, cfg.cta_n, cfg.wg_m, cfg.wg_n
    m_tiles, n_tiles, k_iters = sched_4S.shape[1], n // cta_n, k // (BLOCK_K * cfg.k_chunks)
    split_m = cfg.wg_dim == "m"
    ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body
    chained = cfg.chain and k_iters % cfg.stages == 0  # Pallas chains whole rounds of the stages only
    swizzled_full = _swizzled_full_fits(cfg, out_dtype)

    def body(sched_gmem, a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem):
        allocs = _pipeline(cfg, k_iters, ignore, ignore).get_allocations(
            *_operands(cfg, a_gmem, b_gmem.at[0], sa_gmem, sb_gmem.at[0]))

        # Unswizzled output slices: the ladder below stores from any row. Where it fits, a second,
        # swizzled buffer takes the slices whose rows all belong to the group (bank-conflict free).
        out_slices = (cfg.num_compute_wgs, wg_m, wg_n)
        buffers = dict(out_smem=plgpu.SMEM(out_slices, out_dtype))
        if swizzled_full:
            buffers["full_smem"] = plgpu.SMEM(out_slices, out_dtype, transforms=swizzle_transforms(wg_n, out_dtype))

        @functools.partial(pl.run_scoped, pipeline_allocs=allocs, **buffers, collective_axes="wg")
        def _scope(pipeline_allocs, out_smem, full_smem=None):
            wg_idx = lax.axis_index("wg")
            step = _promote_step(cfg, wg_idx, sb_blocked)

            def run_tile(group, block, ni, compute_context, state=None):
                _pipeline(cfg, k_iters, step, compute_context, state=state)(
                    *_operands(cfg, a_gmem.at[pl.ds(block * cta_m, cta_m), :],
                               b_gmem.at[group, pl.ds(ni * cta_n, cta_n), :],
                               sa_gmem.at[:, pl.ds(block * cta_m, cta_m)],
                               sb_gmem.at[group, :, pl.ds(ni * cta_n, cta_n)]),
                    allocations=pipeline_allocs,
                )

            def tile(loop_info, started):
                """One output tile; `started` (chained only): whether this CTA's chain has begun."""
                (lin,) = loop_info.index
                ti, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, cfg.grid_tile_width)
                group, block, first, rows = (sched_gmem[i, ti] for i in range(4))
                wg_row0 = wg_idx * wg_m if split_m else 0
                out_cols = pl.ds(ni * cta_n + (0 if split_m else wg_idx * wg_n), wg_n)

                def compute_context(run_pipeline):
                    y = run_pipeline(_zero_acc(cfg)).astype(out_dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores read them
                    # This warpgroup's rows of the group: [lo, lo + count) of its wg_m rows.
                    lo = jnp.clip(first - wg_row0, 0, wg_m)
                    count = jnp.clip(first + rows - wg_row0, 0, wg_m) - lo

                    def store_slice():  # all wg_m rows: one store from the swizzled buffer
                        f_smem = full_smem.at[wg_idx]
                        f_smem[...] = y
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(f_smem, out_gmem.at[pl.ds(block * cta_m + wg_row0, wg_m), out_cols])

                    def store_rows():
                        o_smem = out_smem.at[wg_idx]
                        o_smem[...] = y
                        plgpu.commit_smem()
                        store_group_rows(o_smem, out_gmem, lo, count, wg_m, block * cta_m + wg_row0, out_cols)

                    if full_smem is None:
                        store_rows()
                    else:
                        pl.when(count == wg_m)(store_slice)
                        pl.when(count != wg_m)(store_rows)

                if not chained:
                    pl.when(rows > 0)(lambda: run_tile(group, block, ni, compute_context))
                    return None
                # Static states, one branch each (a traced state would need a dynamic prologue).
                pl.when((rows > 0) & (started == 0))(
                    lambda: run_tile(group, block, ni, compute_context, plgpu.PipelinePipeline.START))
                pl.when((rows > 0) & (started != 0))(
                    lambda: run_tile(group, block, ni, compute_context, plgpu.PipelinePipeline.STEADY))
                return jnp.where(rows > 0, 1, started)

            if not chained:
                plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")(lambda info: tile(info, None))
            else:
                started = plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm", init_carry=jnp.int32(0))(
                    lambda info, carry: tile(info, carry))

                # The chain ends in a STOP pipeline, whose memory warpgroup waits for the compute
                # warpgroups' last releases: one more tile (the first), its result dropped.
                @pl.when(started != 0)
                def _stop():
                    def drop(run_pipeline):
                        run_pipeline(_zero_acc(cfg))

                    run_tile(0, 0, 0, drop, plgpu.PipelinePipeline.STOP)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before out_smem goes out of scope

    call = _launch(body, (m, n), out_dtype, cfg, interpret, num_ctas)
    return call(sched_4S, a_MK, b_GNK, saT_JM, sb_GJN)


def m_grouped_unfit_reason(qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G) -> str | None:
    """Why m_grouped_matmul cannot take these operands, or None when it can."""
    if qa_MK.ndim != 2 or qb_GNK.ndim != 3 or sa_MJ.ndim != 2 or sb_GJN.ndim != 3 or group_sizes_G.ndim != 1:
        return "a, sa must be 2-D, b, sb 3-D, group_sizes 1-D"
    if qa_MK.dtype != FP8 or qb_GNK.dtype != FP8:
        return f"operands {qa_MK.dtype}/{qb_GNK.dtype} (the kernel takes float8_e4m3fn)"
    (m, k), (g, n, k2) = qa_MK.shape, qb_GNK.shape
    j = -(-k // BLOCK_K)
    if k2 != k or sa_MJ.shape != (m, j) or sb_GJN.shape != (g, j, n) or group_sizes_G.shape != (g,):
        return (f"shapes a {qa_MK.shape}, sa {sa_MJ.shape}, b {qb_GNK.shape}, sb {sb_GJN.shape}, group_sizes "
                f"{group_sizes_G.shape} do not fit a [M, K], sa [M, ceil(K/128)], b [G, N, K], "
                f"sb [G, ceil(K/128), N], group_sizes [G]")
    if min(m, n, k, g) == 0:
        return "an empty dimension"
    return None


def m_grouped_matmul(qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G, out_dtype=jnp.float32,
                     config: Config | None = None, *, sb_blocked: bool = False, covered: bool = False,
                     interpret=False, num_ctas: int | None = None):
    """y [M, N] (out_dtype): y[rows of g] = block-scaled qa[rows] @ qb[g]^T; zero past the groups.

    qa [M, K], qb [G, N, K] float8_e4m3fn (K-major), sa [M, ceil(K/128)], sb [G, ceil(K/128), N]
    float32, group_sizes [G] int (sum <= M). sb_blocked=True promises sb constant over each
    128-column block. covered=True skips the zeroing select (the caller has no row past
    the groups, or never reads those rows: they are then garbage). `interpret` and `num_ctas` as in
    kernel.block_scaled_matmul (testing).
    """
    cfg = config or M_GROUPED
    check_config(cfg, out_dtype, sb_blocked)
    if (reason := m_grouped_unfit_reason(qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G)) is not None:
        raise ValueError(f"m_grouped_matmul cannot take these operands: {reason}")
    m, n = qa_MK.shape[0], qb_GNK.shape[1]
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    c = cfg.k_chunks  # K padded to whole steps: zero q (and zero scales) add nothing
    a = _pad_to(_pad_to(qa_MK, 1, c * BLOCK_K), 0, cfg.cta_m)
    b = _pad_to(_pad_to(qb_GNK, 2, c * BLOCK_K), 1, cfg.cta_n)
    sa_JM = _pad_to(_pad_to(sa_MJ.astype(jnp.float32).T, 0, c), 1, cfg.cta_m)
    sb = _pad_to(_pad_to(sb_GJN.astype(jnp.float32), 1, c), 2, cfg.cta_n)
    sched = m_tile_schedule(group_sizes_G, a.shape[0], cfg.cta_m)
    y = _m_grouped_call(sched, a, b, sa_JM, sb, jnp.dtype(out_dtype), cfg, sb_blocked, interpret, num_ctas)
    y = y[:m, :n]
    if covered:
        return y
    in_group_M = jnp.arange(m) < group_sizes_G.sum()
    return jnp.where(in_group_M[:, None], y, jnp.zeros((), y.dtype))


# ---- K-grouped: wgrad ---------------------------------------------------------------------------

def _k_grouped_call(tiles_2G, a_KP, b_NP, sa_TK, sb_TN, out_dtype, cfg: Config, interpret, num_ctas):
    """The kernel on aligned operands: K % cta_m == N % cta_n == P % 128 == 0."""
    k, n, g = a_KP.shape[0], b_NP.shape[0], tiles_2G.shape[1]
    cta_m, cta_n, wg_m, wg_n = cfg.cta_m, cfg.cta_n, cfg.wg_m, cfg.wg_n
    m_tiles, n_tiles = k // cta_m, n // cta_n
    split_m = cfg.wg_dim == "m"
    ignore = lambda *_, **__: None  # noqa: E731

    def body(tiles_gmem, a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem):
        # A static grid of `stages` steps allocates what the dynamic grid below uses.
        allocs = _pipeline(cfg, cfg.stages, ignore, ignore).get_allocations(a_gmem, b_gmem, sa_gmem, sb_gmem)

        @functools.partial(pl.run_scoped, pipeline_allocs=allocs,
                           out_smem=plgpu.SMEM((cfg.num_compute_wgs, wg_m, wg_n), out_dtype,
                                               transforms=swizzle_transforms(wg_n, out_dtype)),
                           collective_axes="wg")
        def _scope(pipeline_allocs, out_smem):
            wg_idx = lax.axis_index("wg")
            step = _promote_step(cfg, wg_idx, sb_blocked=False)

            # Groups outermost: concurrent CTAs share one group's token tiles in L2.
            @plgpu.nd_loop((g, m_tiles * n_tiles), collective_axes="sm")
            def _tile_loop(loop_info):
                gi, lin = loop_info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, cfg.grid_tile_width)
                first, num_steps = tiles_gmem[0, gi], tiles_gmem[1, gi]
                out_rows = pl.ds(mi * cta_m + (wg_idx * wg_m if split_m else 0), wg_m)
                out_cols = pl.ds(ni * cta_n + (0 if split_m else wg_idx * wg_n), wg_n)

                def compute_context(run_pipeline):
                    acc = run_pipeline(_zero_acc(cfg))  # an empty group runs no step: zeros
                    o_smem = out_smem.at[wg_idx]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_smem[...] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[gi, out_rows, out_cols])

                _pipeline(cfg, num_steps, step, compute_context, first)(
                    a_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                    b_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                    sa_gmem.at[:, pl.ds(mi * cta_m, cta_m)],
                    sb_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
                    allocations=pipeline_allocs,
                )

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = _launch(body, (g, k, n), out_dtype, cfg, interpret, num_ctas)
    return call(tiles_2G, a_KP, b_NP, sa_TK, sb_TN)


def k_grouped_unfit_reason(qa_KP, sa_KT, qb_NP, sb_NT, tiles_G) -> str | None:
    """Why k_grouped_matmul cannot take these operands, or None when it can."""
    if qa_KP.ndim != 2 or qb_NP.ndim != 2 or sa_KT.ndim != 2 or sb_NT.ndim != 2 or tiles_G.ndim != 1:
        return "a, b, sa, sb must be 2-D, tiles 1-D"
    if qa_KP.dtype != FP8 or qb_NP.dtype != FP8:
        return f"operands {qa_KP.dtype}/{qb_NP.dtype} (the kernel takes float8_e4m3fn)"
    (k, p), (n, p2) = qa_KP.shape, qb_NP.shape
    t = p // BLOCK_K
    if p % BLOCK_K or p2 != p or sa_KT.shape != (k, t) or sb_NT.shape != (n, t):
        return (f"shapes a {qa_KP.shape}, sa {sa_KT.shape}, b {qb_NP.shape}, sb {sb_NT.shape} do not fit "
                f"a [K, 128 T], sa [K, T], b [N, 128 T], sb [N, T]")
    if min(k, n, p, tiles_G.shape[0]) == 0:
        return "an empty dimension"
    return None


def k_grouped_matmul(qa_KP, sa_KT, qb_NP, sb_NT, tile_start_G, tiles_G, out_dtype=jnp.float32,
                     config: Config | None = None, *, interpret=False, num_ctas: int | None = None):
    """dw [G, K, N] (out_dtype) = per group g, sum over its tiles t in [tile_start[g], +tiles[g]) of
    (qa[:, t] @ qb[:, t]^T) * sa[:, t, None] * sb[None, :, t], a tile being 128 tokens.

    qa [K, P], qb [N, P] float8_e4m3fn (tokens contiguous, P = 128 T), sa [K, T], sb [N, T] float32
    (grouped.quantize_wgrad's layout), tile_start and tiles [G] int.
    """
    cfg = config or K_GROUPED
    check_config(cfg, out_dtype, sb_blocked=False)
    if cfg.chain:
        raise ValueError(f"{cfg}: chain serves the M-grouped kernel; the K-grouped kernel's pipelines run "
                         f"a dynamic number of steps per group, which Pallas cannot chain")
    if (reason := k_grouped_unfit_reason(qa_KP, sa_KT, qb_NP, sb_NT, tiles_G)) is not None:
        raise ValueError(f"k_grouped_matmul cannot take these operands: {reason}")
    k, n = qa_KP.shape[0], qb_NP.shape[0]
    a = _pad_to(qa_KP, 0, cfg.cta_m)
    b = _pad_to(qb_NP, 0, cfg.cta_n)
    sa_TK = _pad_to(sa_KT.astype(jnp.float32).T, 1, cfg.cta_m)
    sb_TN = _pad_to(sb_NT.astype(jnp.float32).T, 1, cfg.cta_n)
    tiles_2G = jnp.stack([tile_start_G, tiles_G]).astype(jnp.int32)
    dw = _k_grouped_call(tiles_2G, a, b, sa_TK, sb_TN, jnp.dtype(out_dtype), cfg, interpret, num_ctas)
    return dw[:, :k, :n] if dw.shape[1:] != (k, n) else dw

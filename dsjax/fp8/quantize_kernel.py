"""One read, both tile orientations: fused FP8 quantization kernels (DeepSeek-V3 §3.3.2–3.3.3).

    q_MD, s_MJ, qt_DP, st_DT = quantize_rows_and_tiles(a_MD, group_sizes_G)   # activations
    q_GKN, qt_GNK, s_GJL = quantize_weight_blocks(w_GKN)                      # weights
    q_GKN, qt_GNK, s_GJL = quantize_weight_blocks(w_gate_GKF, w_up_GKF)       # of [w_gate | w_up]
    q_GKN, qt_GNK, s_GJL = quantize_weight_blocks(w_GKN, round_to="bfloat16")  # float32 masters

Block mode quantizes every activation of a GEMM twice: in 1x128 tiles along the features (each
row; for the forward and input-gradient GEMMs) and in 128x1 tiles along tokens (for the weight
gradient, §3.3.3), the latter transposed, so that tokens are the contiguous dim the weight-gradient
kernel contracts, and laid out per group with each group's rows starting on a 128-row tile
(grouped.py's weight-gradient layout; a dense layer is one group). In XLA that is a row
quantization, a gather into the padded layout and a transposing quantization — three passes over
the activation, the transposing ones the slowest fusions of a configs/small.py FP8 step
(BENCHMARKS.md). This kernel reads each 128x128 tile of the activation once and writes both:

    q_MD  float8_e4m3fn [M, D]   = quantize_blocks(a, (1, 128))[0] on the groups' rows
    s_MJ  float32 [M, D/128]     its scales
    qt_DP float8_e4m3fn [D, P]   = quantize_blocks(pad_groups(a).T, (1, 128))[0], P = 128 T
    st_DT float32 [D, T]         its scales (1 on all-zero tiles, as everywhere in dsjax.fp8)

The same math and rounding as quantize_blocks (scale = amax * fl(1/448), q = rne(clip(x *
fl(1/scale)))); tests/test_fp8_quantize_kernel.py checks bit equality in Pallas's interpreter.
Rows of a past the groups are not quantized: their q_MD and s_MJ rows are left unwritten, as the
grouped kernels never read them (dropless dispatch has no such rows; expert-parallel buffers do).

Pallas' Triton backend (a bandwidth-bound tile transform needs no wgmma, and Triton kernels run in
the interpreter on CPU, so CI checks these); D must be a multiple of 128. Each program takes one
128-row tile t of the padded layout and one 128-column block j (or `column_blocks` consecutive
ones, unrolled, so that more loads are in flight per program: a tunable, 1 unless timings say
otherwise): it reads the tile's rows from their dynamic start (a group's rows are contiguous: one
128-row slice), masked past the group's end.
On one H200 (2026-11-29, scripts/check_fp8_quantize.py): bit-identical to the XLA passes, 12-14x
faster on configs/small.py's expert activations (1.8-2.1 TB/s against ~150 GB/s).

The weights' kernel does the same for 128x128 blocks (§3.3.2): each block is read once and
written as a block of w and as the transposed block of w^T, since the forward GEMM reads w^T and
the input-gradient GEMM w, both K-major (FP8 WGMMA takes no other operand order). Given several
weights it quantizes their concatenation along N without materializing it (each output block
reads the one input that holds it): the experts' gate and up projections run as one GEMM, whose
weights would otherwise be concatenated every step (2.4 ms of a configs/small.py FP8 step).
On one H200 (2026-11-29): bit-identical, 1.65-1.7x XLA's passes on small.py's expert weights
(2.9 TB/s). `weight_blocks` picks it or XLA's passes by backend. `round_to` quantizes float32
master weights as their compute-dtype cast, without writing that cast (model/fp8_weights.py, which
quantizes all layers' expert weights in one call before the layer scan).

Transposes: the tile for the transposed output goes through shared memory as float32 (64 KB per
128x128 tile). Transposing the quantized fp8 (or packed uint16) result instead, a quarter of the
bytes, was no faster on one H200 (0.434 vs 0.423 ms on small.py's expert x; 2026-11-29) and its
output differed from XLA's on one shape there (all 7 layers' float32 w_down masters) though not in
the interpreter, so it was removed. The activations' kernels run at ~2 TB/s of the H200's 4.8 and
take ~16 ms of a configs/small.py FP8 step.

Array size: Pallas's Triton lowering addresses an array of at most 2^32 bytes with 32-bit element
offsets, which wrap at 2^31 elements (`offsets_wrap`): all 7 MoE layers' [gate | up] blocks of
configs/small.py (2.58e9 fp8 values per orientation) were written out of bounds and the step
stopped learning. The weights' kernel then writes each orientation as uint16 pairs of fp8 values
(half the elements; parity-strided loads and stores) and views them back as fp8, which costs no copy;
the activations' kernel refuses such shapes (XLA's passes take them).

Deviation: none in the math. JAX 0.11 deprecates the Pallas Triton backend (as for the
flash-decoding kernel); these kernels would move to Mosaic GPU with it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.fp8.quantize import E4M3_MAX, quantize_blocks

BLOCK = 128
NUM_WARPS = 8
_INV_E4M3_MAX = float(np.float32(1.0 / E4M3_MAX))  # what XLA's simplifier makes of x / 448


def _scales(amax):
    scale = amax * _INV_E4M3_MAX
    return jnp.where(scale > 0, scale, 1.0)


def _quantized(x, scale):
    return jnp.clip(x * (1.0 / scale), -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


def _kernel(start_ref, rows_ref, a_ref, q_ref, s_ref, qt_ref, st_ref, *, column_blocks):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    t, jc = pl.program_id(0), pl.program_id(1)
    valid_R = jnp.arange(BLOCK, dtype=jnp.int32) < rows_ref[t]
    rows = pl.ds(start_ref[t], BLOCK)  # may run past a's end: those rows are masked
    for c in range(column_blocks):  # unrolled: the blocks' loads do not wait on each other
        j = jc * column_blocks + c
        cols = pl.ds(pl.multiple_of(j * BLOCK, BLOCK), BLOCK)
        a_RC = plgpu.load(a_ref.at[rows, cols], mask=valid_R[:, None], other=0).astype(jnp.float32)
        abs_RC = jnp.abs(a_RC)

        scale_R = _scales(abs_RC.max(axis=1))  # 1x128 tiles along the features: one per row
        plgpu.store(q_ref.at[rows, cols], _quantized(a_RC, scale_R[:, None]), mask=valid_R[:, None])
        plgpu.store(s_ref.at[j, rows], scale_R, mask=valid_R)

        scale_C = _scales(abs_RC.max(axis=0))  # 128x1 tiles along tokens: one per column
        here = pl.ds(c * BLOCK, BLOCK)  # this block's rows of the program's qt / st blocks
        qt_ref[here, :] = _quantized(a_RC.T, scale_C[:, None])
        st_ref[here] = scale_C


@functools.partial(jax.jit, static_argnames=("num_tiles", "interpret", "num_warps", "column_blocks"))
def _call(a_MD, start_T, rows_T, *, num_tiles: int, interpret: bool, num_warps: int, column_blocks: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, d = a_MD.shape
    j = d // BLOCK
    width = column_blocks * BLOCK
    whole = pl.BlockSpec(memory_space=None)
    q_MD, s_JM, qt_DP, st_TD = pl.pallas_call(
        functools.partial(_kernel, column_blocks=column_blocks),
        grid=(num_tiles, j // column_blocks),
        in_specs=[whole, whole, whole],
        out_specs=[whole, whole,
                   pl.BlockSpec((width, BLOCK), lambda t, jj: (jj, t)),
                   pl.BlockSpec((None, width), lambda t, jj: (t, jj))],
        out_shape=[jax.ShapeDtypeStruct((m, d), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((j, m), jnp.float32),
                   jax.ShapeDtypeStruct((d, num_tiles * BLOCK), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((num_tiles, d), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(start_T, rows_T, a_MD)
    return q_MD, s_JM.T, qt_DP, st_TD.T


class WeightBlocks(NamedTuple):
    """A weight's 128x128 FP8 blocks in both K-major orientations, as `weight_blocks` makes them."""

    q_GKN: jax.Array  # float8_e4m3fn [G, K, N]
    qt_GNK: jax.Array  # float8_e4m3fn [G, N, K], the same blocks transposed
    s_GJL: jax.Array  # float32 [G, K/128, N/128] dequantization scales


def _weight_kernel(*refs, starts, round_to, packed):
    """One 128x128 output block (g, j, l): read from the input whose blocks along N hold l
    (inputs i cover blocks starts[i] .. starts[i+1] - 1), written in both orientations; values
    rounded to `round_to` first when given (a float32 master weight read as its bf16 cast).
    `packed`: the fp8 outputs are uint16 arrays of half the columns, each element two neighbouring
    fp8 values (low byte first): the block is read as its four (row, column) parities, [64, 64] each,
    and each orientation's even and odd rows are stored as strided rows."""
    from jax.experimental import pallas as pl

    *w_refs, q_ref, qt_ref, s_ref = refs

    def load(w_ref, *index):
        w = w_ref[index] if index else w_ref[...]
        return (w if round_to is None else w.astype(round_to)).astype(jnp.float32)

    def quantize(w_ref):
        if not packed:
            w_KN = load(w_ref)
            scale = _scales(jnp.abs(w_KN).max())  # one per 128x128 block
            q_ref[...] = _quantized(w_KN, scale)
            qt_ref[...] = _quantized(w_KN.T, scale)
            s_ref[...] = scale
            return
        half = BLOCK // 2
        even, odd = pl.ds(0, half, stride=2), pl.ds(1, half, stride=2)
        ee, eo, oe, oo = (load(w_ref, r, c) for r in (even, odd) for c in (even, odd))  # [row, col] parity
        scale = _scales(jnp.maximum(jnp.maximum(jnp.abs(ee).max(), jnp.abs(eo).max()),
                                    jnp.maximum(jnp.abs(oe).max(), jnp.abs(oo).max())))

        def pack(lo, hi):  # two fp8 values per uint16, lo in the low byte (the earlier column)
            lo, hi = (jax.lax.bitcast_convert_type(_quantized(v, scale), jnp.uint8).astype(jnp.uint16)
                      for v in (lo, hi))
            return lo | (hi << 8)

        q_ref[even, :] = pack(ee, eo)  # row 2i of w: columns (2c, 2c + 1) = (ee, eo)[i, c]
        q_ref[odd, :] = pack(oe, oo)
        # row 2c of w^T: columns (2i, 2i + 1) = (ee, oe)[i, c]
        qt_ref[even, :] = pack(ee.T, oe.T)
        qt_ref[odd, :] = pack(eo.T, oo.T)
        s_ref[...] = scale

    if len(w_refs) == 1:
        quantize(w_refs[0])
        return
    ll = pl.program_id(2)
    for w_ref, lo, hi in zip(w_refs, starts[:-1], starts[1:]):
        pl.when((ll >= lo) & (ll < hi))(functools.partial(quantize, w_ref))


OFFSET_LIMIT = 2**31  # elements a signed 32-bit offset reaches; 2x this in bytes gets 64-bit offsets


def offsets_wrap(shape, dtype) -> bool:
    """Whether Pallas's Triton lowering would address an array of this shape with wrapping offsets:
    it computes element offsets in 32 bits unless the array exceeds 2^32 bytes (jax 0.10-0.11,
    pallas/triton/lowering.py), and a signed 32-bit offset wraps at 2^31 elements. So an fp8 array of
    2^31-2^32 elements is written out of bounds: configs/small.py's gate|up blocks of all 7 MoE
    layers at once (2.58e9) corrupted the step on an H200 (2026-11-29)."""
    n = math.prod(shape)
    return n >= OFFSET_LIMIT and n * jnp.dtype(dtype).itemsize <= 2 * OFFSET_LIMIT


@functools.partial(jax.jit, static_argnames=("round_to", "interpret", "num_warps"))
def quantize_weight_blocks(*ws_GKN: jax.Array, round_to=None, interpret: bool = False,
                           num_warps: int = NUM_WARPS) -> WeightBlocks:
    """(q_GKN, qt_GNK, s_GJL): stacked weights [G, K, N] in 128x128 blocks, in both K-major
    orientations (the forward GEMM reads w^T, dgrad w), from one read of each block; equal to
    quantize_blocks(w, (128, 128)) and to quantize_blocks of w transposed. Several weights [G, K, N_i]
    give those of their concatenation along N (not materialized). K and every N_i must be
    multiples of 128 (`weight_unfit_reason`). `round_to` (a dtype name, e.g. "bfloat16"): quantize
    w.astype(round_to) without writing that cast (float32 master weights, read once)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    for w_GKN in ws_GKN:
        reason = weight_unfit_reason(w_GKN)
        if reason is not None:
            raise ValueError(f"quantize_weight_blocks: {reason}")
    g, k = ws_GKN[0].shape[:2]
    if any(w.shape[:2] != (g, k) or w.dtype != ws_GKN[0].dtype for w in ws_GKN):
        raise ValueError("quantize_weight_blocks: weights to concatenate need one [G, K] and one dtype; got "
                         + ", ".join(f"{w.dtype}{list(w.shape)}" for w in ws_GKN))
    counts = [w.shape[2] // BLOCK for w in ws_GKN]
    starts = tuple(int(v) for v in np.cumsum([0] + counts))
    n, j, l = sum(w.shape[2] for w in ws_GKN), k // BLOCK, starts[-1]

    # An fp8 output that 32-bit offsets cannot address (`offsets_wrap`) is written as uint16 pairs
    # (half the elements) and viewed back as fp8: bitcasts, no copy.
    packed = offsets_wrap((g, k, n), jnp.float8_e4m3fn)
    width, out_dtype = (BLOCK // 2, jnp.uint16) if packed else (BLOCK, jnp.float8_e4m3fn)

    def block_of(lo, count):  # input blocks past an input's range are clamped (and not read)
        return pl.BlockSpec((None, BLOCK, BLOCK), lambda gg, jj, ll: (gg, jj, jnp.clip(ll - lo, 0, count - 1)))

    q, qt, s = pl.pallas_call(
        functools.partial(_weight_kernel, starts=starts, round_to=round_to, packed=packed),
        grid=(g, j, l),
        in_specs=[block_of(lo, count) for lo, count in zip(starts, counts)],
        out_specs=[pl.BlockSpec((None, BLOCK, width), lambda gg, jj, ll: (gg, jj, ll)),
                   pl.BlockSpec((None, BLOCK, width), lambda gg, jj, ll: (gg, ll, jj)),
                   pl.BlockSpec((None, None, None), lambda gg, jj, ll: (gg, jj, ll))],
        out_shape=[jax.ShapeDtypeStruct((g, k, n * width // BLOCK), out_dtype),
                   jax.ShapeDtypeStruct((g, n, k * width // BLOCK), out_dtype),
                   jax.ShapeDtypeStruct((g, j, l), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(*ws_GKN)
    if packed:
        q, qt = (jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(
            x.shape[:-1] + (2 * x.shape[-1],)), jnp.float8_e4m3fn) for x in (q, qt))
    return WeightBlocks(q, qt, s)


def weight_blocks(ws_GKN: tuple, backend: str, round_to: Optional[str] = None) -> WeightBlocks:
    """The WeightBlocks of the weights `ws_GKN` ([G, K, N_i] each) concatenated along N (usually
    just one), rounded to `round_to` first when given: through `quantize_weight_blocks` for backend
    "pallas_gpu" when it fits; otherwise (other backends, K or an N_i not a multiple of 128) XLA's
    quantize_blocks, into which the cast and the concatenation fuse, and whose q^T is the same
    values transposed (a 128x128 block stays a block)."""
    if backend == "pallas_gpu" and all(weight_unfit_reason(w) is None for w in ws_GKN):
        return quantize_weight_blocks(*ws_GKN, round_to=round_to)
    w_GKN = ws_GKN[0] if len(ws_GKN) == 1 else jnp.concatenate(ws_GKN, axis=2)
    if round_to is not None:  # the barrier keeps the rounding: with excess precision allowed (XLA's
        # default) XLA:GPU may drop a float32 -> bf16 -> float32 round trip inside a fusion
        w_GKN = jax.lax.optimization_barrier(w_GKN.astype(round_to))
    q_GKN, s_GJL = quantize_blocks(w_GKN, (BLOCK, BLOCK))
    return WeightBlocks(q_GKN, q_GKN.transpose(0, 2, 1), s_GJL)


def weight_unfit_reason(w_GKN) -> str | None:
    """Why `quantize_weight_blocks` cannot take w, or None."""
    if w_GKN.ndim != 3 or w_GKN.shape[1] % BLOCK or w_GKN.shape[2] % BLOCK:
        return f"weights {w_GKN.shape} (needs [G, K, N] with K and N multiples of {BLOCK})"
    if offsets_wrap(w_GKN.shape, w_GKN.dtype):  # the fp8 outputs that would wrap are written packed
        return f"weights {w_GKN.dtype}{list(w_GKN.shape)} (32-bit offsets would wrap)"
    return None


def unfit_reason(a_MD, num_groups: int = 1) -> str | None:
    """Why the kernel cannot take `a` (rows in `num_groups` groups), or None."""
    if a_MD.ndim != 2 or a_MD.shape[0] == 0 or a_MD.shape[1] % BLOCK:
        return f"activation {a_MD.shape} (needs [M > 0, D] with D a multiple of {BLOCK})"
    m, d = a_MD.shape
    padded = m + (BLOCK - 1) * num_groups  # rows of the weight-gradient layout, at most
    if any(offsets_wrap(shape, dtype) for shape, dtype in (((m, d), a_MD.dtype), ((m, d), jnp.float8_e4m3fn),
                                                            ((d, padded), jnp.float8_e4m3fn))):
        return f"activation {a_MD.dtype}{list(a_MD.shape)} in {num_groups} groups (32-bit offsets would wrap)"
    return None


def quantize_rows_and_tiles(a_MD: jax.Array, group_sizes_G: jax.Array, *, interpret: bool = False,
                            num_warps: int = NUM_WARPS, column_blocks: int = 1):
    """(q_MD, s_MJ, qt_DP, st_DT) of a [M, D] (rows sorted into contiguous groups); see the module
    docstring. `interpret` runs Pallas's interpreter (CPU tests); `num_warps` per program;
    `column_blocks`: 128-column blocks per program (a divisor of D / 128), one after another in
    one row tile (scripts/check_fp8_quantize.py --num_warps / --column_blocks time others)."""
    from dsjax.fp8.grouped import tile_rows

    reason = unfit_reason(a_MD, group_sizes_G.shape[0])
    if reason is not None:
        raise ValueError(f"quantize_rows_and_tiles: {reason}")
    blocks = a_MD.shape[1] // BLOCK
    if column_blocks < 1 or blocks % column_blocks:
        raise ValueError(f"quantize_rows_and_tiles: column_blocks={column_blocks} does not divide the "
                         f"{blocks} 128-column blocks of activation {a_MD.shape}")
    start_T, rows_T = tile_rows(group_sizes_G.astype(jnp.int32), a_MD.shape[0])
    return _call(a_MD, start_T, rows_T, num_tiles=start_T.shape[0], interpret=interpret, num_warps=num_warps,
                 column_blocks=column_blocks)

"""Flash-decoding over MLA's latent cache: one pass over c_KV and k_R per decode step (GPU).

In absorbed decoding (DeepSeek-V2 §2.1.2; dsjax/model/mla.py) every head attends over the same
cached latent: scores = q_lat·c_KV + q_rope·k_R, out_lat = softmax(scores)·c_KV. Written as two
XLA einsums the cache is read twice (scores, then the weighted sum), each time through a batched
GEMM with only T·H query rows. This kernel reads each cached slot once: a program owns one batch
row and one split of the slots, holds all T·H query rows (MQA-style, as FlashMLA does), and runs
an online softmax over blocks of `BLOCK_S` slots; the splits are merged by their log-sum-exp
(flash-decoding). With more query rows than one program holds (V3 decodes 128 heads) the rows are
tiled too, and the cache is read once per row tile. The kernel returns the unnormalized merge
pieces, so the caller can fold in attention to the call's own new entries the same way.

Written for Pallas' Triton backend (runs on NVIDIA GPUs; `interpret=True` runs the same kernel
on CPU, which is how the tests check it). Limits: C and R powers of two >= 16, the slot count a
multiple of `BLOCK_S`; query rows are padded to a power of two >= 16 (at most `MAX_ROWS` per
tile). `fits` says whether a call qualifies; mla.py keeps its XLA path otherwise. XLA cannot
partition the kernel's custom call, so under a mesh of several devices `sharded_latent_attention`
runs it in a shard_map over the batch axes ('data', 'expert'), each device on its own rows of the
batch-sharded cache (query rows are gathered over 'tensor': they are small).

Masks: a slot is visible to query row r iff it holds a token (position >= 0) whose position is
<= the row's query position — the same rule as `mla.attention_mask`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from dsjax.sharding import BATCH

BLOCK_S = 64  # slots per inner step
MAX_ROWS = 32  # query rows one program holds (its accumulator [rows, C] lives in registers)
TARGET_PROGRAMS = 264  # ~2 waves of an H100/H200's 132 SMs
MAX_SPLIT = 1024  # slots per program at most (a program's cache block is [MAX_SPLIT, C])
NUM_WARPS, NUM_STAGES = 4, 2
NEG_INF = -1e30


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fits(c: int, r: int, slots: int) -> bool:
    """Whether the kernel takes cached slots of widths C (latent) and R (rope key), `slots` of them."""
    return c == _pow2(c) and r == _pow2(r) and c >= 16 and r >= 16 and slots % BLOCK_S == 0


def _splits(programs: int, slots: int) -> int:
    """Slot splits per (batch row, row tile): enough programs for the GPU and at most MAX_SPLIT slots
    per program, each split a whole number of blocks."""
    blocks = slots // BLOCK_S
    want = max(1, -(-TARGET_PROGRAMS // programs), -(-slots // MAX_SPLIT))
    divisors = [d for d in range(1, min(want, blocks) + 1) if blocks % d == 0]
    pow2 = [d for d in divisors if (blocks // d) & (blocks // d - 1) == 0]  # Triton prefers 2^n-slot splits
    return max(pow2 or divisors)


def _block(i):
    """The i-th BLOCK_S slots of a program's split."""
    from jax.experimental import pallas as pl
    return pl.ds(pl.multiple_of(i * BLOCK_S, BLOCK_S), BLOCK_S)


def _kernel(q_lat_ref, q_rope_ref, q_pos_ref, c_ref, kr_ref, kv_pos_ref, o_ref, m_ref, l_ref, *, scale, steps):
    from jax.experimental.pallas import triton as plgpu

    q_lat_QC = q_lat_ref[...]
    q_rope_QR = q_rope_ref[...]
    q_pos_Q = q_pos_ref[...]
    rows, c = q_lat_QC.shape

    def body(i, carry):
        o_QC, m_Q, l_Q = carry
        s = _block(i)
        c_SC = c_ref[s, :]
        scores_QS = (plgpu.dot(q_lat_QC, c_SC, trans_b=True)
                     + plgpu.dot(q_rope_QR, kr_ref[s, :], trans_b=True)) * scale
        kv_pos_S = kv_pos_ref[s]
        visible_QS = (kv_pos_S[None, :] >= 0) & (kv_pos_S[None, :] <= q_pos_Q[:, None])
        scores_QS = jnp.where(visible_QS, scores_QS, NEG_INF)
        m_new_Q = jnp.maximum(m_Q, scores_QS.max(axis=1))
        p_QS = jnp.exp(scores_QS - m_new_Q[:, None])
        p_QS = jnp.where(visible_QS, p_QS, 0.0)  # a row with nothing visible yet keeps l = 0
        correction_Q = jnp.exp(m_Q - m_new_Q)
        o_QC = o_QC * correction_Q[:, None] + plgpu.dot(p_QS.astype(c_SC.dtype), c_SC)
        return o_QC, m_new_Q, l_Q * correction_Q + p_QS.sum(axis=1)

    init = (jnp.zeros((rows, c), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o_QC, m_Q, l_Q = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = o_QC
    m_ref[...] = m_Q
    l_ref[...] = l_Q


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def latent_attention(q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC, kr_BSR, kv_pos_BS, *, scale: float,
                     interpret: bool = False):
    """Unnormalized attention of Q = T·H query rows over the cached slots, merged over splits.

    Returns (o_BQC, m_BQ, l_BQ) in float32: o = Σ_s exp(score_s − m)·c_s, l = Σ_s exp(score_s − m),
    m the running max (NEG_INF with l = 0 where a row sees no slot). softmax·c = o / l.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, q, c = q_lat_BQC.shape
    s, r = c_BSC.shape[1], kr_BSR.shape[-1]
    rows = min(_pow2(max(q, 16)), MAX_ROWS)  # one tile's rows
    tiles = -(-q // rows)
    if rows * tiles != q:
        pad = ((0, 0), (0, rows * tiles - q), (0, 0))
        q_lat_BQC, q_rope_BQR = jnp.pad(q_lat_BQC, pad), jnp.pad(q_rope_BQR, pad)
        q_pos_BQ = jnp.pad(q_pos_BQ, ((0, 0), (0, rows * tiles - q)), constant_values=-1)
    splits = _splits(b * tiles, s)
    per = s // splits
    q_lat_BQC = q_lat_BQC.astype(c_BSC.dtype)
    q_rope_BQR = q_rope_BQR.astype(kr_BSR.dtype)
    o_BJQC, m_BJQ, l_BJQ = pl.pallas_call(
        functools.partial(_kernel, scale=scale, steps=per // BLOCK_S),
        grid=(b, tiles, splits),
        in_specs=[
            pl.BlockSpec((None, rows, c), lambda i, k, j: (i, k, 0)),
            pl.BlockSpec((None, rows, r), lambda i, k, j: (i, k, 0)),
            pl.BlockSpec((None, rows), lambda i, k, j: (i, k)),
            pl.BlockSpec((None, None, per, c), lambda i, k, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, per, r), lambda i, k, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, per), lambda i, k, j: (i, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, c), lambda i, k, j: (i, j, k, 0)),
            pl.BlockSpec((None, None, rows), lambda i, k, j: (i, j, k)),
            pl.BlockSpec((None, None, rows), lambda i, k, j: (i, j, k)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, splits, rows * tiles, c), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, rows * tiles), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, rows * tiles), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
    )(q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC.reshape(b, splits, per, c), kr_BSR.reshape(b, splits, per, r),
      kv_pos_BS.reshape(b, splits, per))
    m_BQ = m_BJQ.max(axis=1)
    w_BJQ = jnp.exp(m_BJQ - m_BQ[:, None])
    o_BQC = (o_BJQC * w_BJQ[..., None]).sum(axis=1)
    l_BQ = (l_BJQ * w_BJQ).sum(axis=1)
    return o_BQC[:, :q], m_BQ[:, :q], l_BQ[:, :q]


def sharded_latent_attention(q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC, kr_BSR, kv_pos_BS, *, scale: float,
                             interpret: bool = False):
    """`latent_attention` on the active mesh: per device over its batch rows when the mesh has
    several devices and the batch divides over ('data', 'expert'); the plain call otherwise."""
    call = functools.partial(latent_attention, scale=scale, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or any(t == AxisType.Manual for t in mesh.axis_types):
        return call(q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC, kr_BSR, kv_pos_BS)
    batch_axes = tuple(a for a in BATCH if a in mesh.axis_names)
    if q_lat_BQC.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        return call(q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC, kr_BSR, kv_pos_BS)
    rows = P(batch_axes)
    return jax.shard_map(call, mesh=mesh, in_specs=(rows,) * 6, out_specs=(rows,) * 3, check_vma=False)(
        q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC, kr_BSR, kv_pos_BS)

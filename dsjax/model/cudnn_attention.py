"""cuDNN flash attention for MLA's training/prefill path (`model.attention = "cudnn"`, GPU only).

    attention(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHO, segment_ids_BT, scale) -> [B,T,H,O]

MLA's head dims differ from what the fused kernel's public API takes, so the shared rope key is
broadcast to every head and V is zero-padded to the query/key width (the padding columns come out
as zeros and are sliced off).

Packed rows (several documents per row, `segment_ids` 0 on padding, 1, 2, … per document) are
passed to cuDNN as a packed ("THD") batch: per row, the length and start offset of each run of
equal segment ids, causal within each run (jax's cuDNN `dot_product_attention` with q/kv offsets
and MaskType.PADDING_CAUSAL). Padding is a run of its own, so it never mixes with a document
and its outputs stay finite. The layout has room for MAX_RUNS runs per row; a batch with a row
holding more takes the exact fallback, an explicit [B, 1, T, S] segment mask, through a lax.cond
(both branches are compiled; one runs). Measured on one H200 at configs/small.py's shapes
(B 8, T 2048, 16 heads, width 192), forward + backward: 4.58 ms with the explicit mask, 2.26 ms
packed (3 documents per row), 2.40 ms causal-only (scripts/check_cudnn_attention.py).

On a mesh the call runs per device in a shard_map — batch rows over ('data', 'expert'), heads over
'tensor' when they divide — so the packed offsets are always computed from one device's own rows
and never depend on how the internal module partitions its custom call.

Deviation: the packed layout goes through jax's internal `jax._src.cudnn.fused_attention_stablehlo`
(the public `jax.nn.dot_product_attention` has no segment or offsets argument); it is imported
here only, lazily, so CPU and TPU never touch it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from dsjax.sharding import BATCH

MAX_RUNS = 16  # segment runs per row the packed layout holds; more take the masked fallback


def runs(segment_ids_BT, max_runs: int = MAX_RUNS):
    """Lengths [B, R] and start offsets [B, R + 1] of each row's runs of equal segment ids, in
    order, -1 past the last run (cuDNN's packed layout), and whether every row fits in R runs."""
    b, t = segment_ids_BT.shape
    new_BT = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    run_BT = jnp.cumsum(new_BT, axis=1) - 1  # which run each column is in
    count_B = run_BT[:, -1] + 1
    r_R = jnp.arange(max_runs)
    lengths_BR = (run_BT[:, :, None] == r_R).sum(1).astype(jnp.int32)
    starts_BR = jnp.where(new_BT[:, :, None] & (run_BT[:, :, None] == r_R), jnp.arange(t)[:, None], 0).sum(1)
    real_BR = r_R[None, :] < count_B[:, None]
    lengths_BR = jnp.where(real_BR, lengths_BR, -1)
    offsets_BR1 = jnp.concatenate([jnp.where(real_BR, starts_BR, -1), jnp.full((b, 1), -1)], axis=1)
    return lengths_BR, offsets_BR1.astype(jnp.int32), jnp.all(count_B <= max_runs)


def _expand(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHO):
    b, s, h, o = v_BSHO.shape
    q_BTHX = jnp.concatenate([q_nope_BTHK, q_rope_BTHR], axis=-1)
    k_BSHX = jnp.concatenate(
        [k_nope_BSHK, jnp.broadcast_to(k_rope_BSR[:, :, None, :], (b, s, h, k_rope_BSR.shape[-1]))], axis=-1)
    v_BSHX = jnp.pad(v_BSHO, ((0, 0), (0, 0), (0, 0), (0, q_BTHX.shape[-1] - o)))
    return q_BTHX, k_BSHX, v_BSHX


def attention(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHO, segment_ids_BT, scale):
    """Causal attention within each segment, [B, T, H, O] in v's dtype, per device on a mesh."""
    args = (q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHO, segment_ids_BT)
    call = functools.partial(_attend, scale=scale)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or any(t == AxisType.Manual for t in mesh.axis_types):
        return call(*args)
    batch = tuple(a for a in BATCH if a in mesh.axis_names)
    if q_nope_BTHK.shape[0] % math.prod(mesh.shape[a] for a in batch):
        return call(*args)
    heads = "tensor" if "tensor" in mesh.axis_names and q_nope_BTHK.shape[2] % mesh.shape["tensor"] == 0 else None
    per_head, per_row = P(batch, None, heads, None), P(batch, None, None)
    return jax.shard_map(call, mesh=mesh, in_specs=(per_head, per_head, per_head, per_row, per_head, P(batch, None)),
                         out_specs=per_head, check_vma=False)(*args)


def _attend(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHO, segment_ids_BT, *, scale):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    o = v_BSHO.shape[-1]
    q_BTHX, k_BSHX, v_BSHX = _expand(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHO)
    lengths_BR, offsets_BR1, fits = runs(segment_ids_BT)

    def packed(q, k, v):
        return dot_product_attention(q, k, v, None, None, lengths_BR, lengths_BR, offsets_BR1, offsets_BR1,
                                     scale=scale, mask_type=MaskType.PADDING_CAUSAL)

    def masked(q, k, v):
        same_B1TS = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=same_B1TS, scale=scale, is_causal=True,
                                            implementation="cudnn")

    out_BTHX = jax.lax.cond(fits, packed, masked, q_BTHX, k_BSHX, v_BSHX)
    return out_BTHX[..., :o]

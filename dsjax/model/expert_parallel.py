"""Expert parallelism: routed experts sharded over the mesh's 'expert' axis, tokens moved to them.

DeepSeek-V3 (§3.2, §3.2.2) trains with 64-way expert parallelism across 8 nodes: a token is
dispatched over IB to each node holding one of its experts and forwarded over NVLink to the GPUs
there, and node-limited routing (§2.1.2) bounds each token to M = 4 nodes. Its dispatch sends a
token once per destination and its combine returns one weighted sum per destination (DeepEP).

dsjax does the same inside one jax.shard_map over the ('data', 'expert', 'tensor') mesh; the route
(expert ids, gate weights) is computed before, outside it. Per device, with N local tokens, S expert
shards, E_l = E / S local experts, top-k:

1. Dispatch. A token goes once to each shard holding any of its k experts, with its k local expert
   ids and gate weights (slots on other shards masked). Ids outside [0, E) are sent nowhere.
2. Exchange over 'expert' (config.moe.expert_parallel):
   - "all_to_all": fixed [S·N, D] buffers, N rows per destination: dropless in the worst case (all
     N tokens to one shard); memory 2·S·N·D per direction, as many bytes moved whatever the route.
   - "ragged_all_to_all": only the rows sent ([N·min(S, k), D] out, [S·N, D] in), placed at the
     same offsets as the fixed buffers, so everything downstream is shared. XLA:CPU lacks it: it is
     exercised on GPU (scripts/bench_moe.py). Reported weak inside one NVLink domain (anchor J16).
3. Compute. Received rows are expanded into (row, local expert) pairs — at most S·N·min(k, E_l),
   the static worst case — sorted by expert, run through the grouped SwiGLU (dispatch.ffn_grouped:
   grouped_gemm.gmm, whose Pallas kernel skips the empty tail), weighted by the gates and summed
   per row: one combined row goes back per row received. The padding pairs past the real ones are
   never zeroed inside the grouped GEMMs (ffn_grouped's past_groups="unread"); the combine and the
   gather's gradient select the real pairs instead, so no extra pass runs over the worst-case
   buffer. Every other pass over it (the gather, the SwiGLU, the combine) still costs
   S·N·min(k, E_l) rows, S times a balanced device's N·k: why dropless expert = 4 scales worse
   than expert = 2 (configs/small.py on 4 H200s: 67.8% per GPU). config.moe.ep_pair_capacity =
   c > 0 bounds the buffer at ceil(c·N·k) pairs instead: the first pairs in arrival order (source
   shard, then token) are kept, the rest dropped and counted, as capacity dispatch counts its drops
   (c = 2: 81.6%, no measurable drops; BENCHMARKS.md). The received rows are named
   `remat_names.EXCHANGED`, so a remat'd layer keeps them and its backward pass does not repeat the
   exchange (S·N·D per layer and device in memory; 4 all-to-alls per MoE layer, not 5).
4. Combine. The reverse exchange, a sum over shards, and a psum over 'tensor': each tensor shard
   holds a slice of F, so its down projection is a partial sum (SwiGLU is elementwise in F).

Node-limited routing needs no code here: with n_group a multiple of S each routing group lies inside
one shard, so topk_group bounds the shards a token reaches (V3: 8 groups = 8 nodes, 4 kept).

Deviations. Combined rows travel back in the compute dtype (V3 also combines in BF16). The exchange
is not overlapped with compute (no DualPipe). Capacity dispatch is supported: each destination
keeps the first `cap` pairs per expert in token order, with cap = ceil(capacity_factor · N_slice ·
k / E) over the tokens of its data slice — the single-device rule exactly when mesh.data == 1, a
per-data-slice capacity (GShard's groups) otherwise. "dense" dispatch (the reference) stays local.
Token counts not divisible by data·expert (decoding one sequence) are padded with ids of -1.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.fp8.quantize_kernel import WeightBlocks
from dsjax.model import dispatch
from dsjax.remat_names import EXCHANGED, saved
from dsjax.sharding import BATCH

EXPERT = "expert"
TENSOR = "tensor"


def mesh_for(config: ModelConfig):
    """The active mesh when routed experts should run under shard_map, else None (local dispatch):
    an 'expert' axis > 1, or a Pallas grouped GEMM (which XLA cannot partition) on > 1 device."""
    if config.moe.dispatch == "dense":
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT not in mesh.axis_names:
        return None
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return None  # already inside a shard_map
    if mesh.shape[EXPERT] > 1 or (config.moe.grouped_gemm != "xla" and mesh.size > 1):
        return mesh
    return None


def weight_specs(tensor):
    """The shard_map specs of the routed experts' weights (gate, up, down): experts over 'expert',
    the expert width F over `tensor` (None: unsplit)."""
    return P(EXPERT, None, tensor), P(EXPERT, None, tensor), P(EXPERT, tensor, None)


def block_specs(tensor):
    """The specs of their FP8 blocks (dispatch.ExpertBlocks), split as the weights they come from:
    [gate | up] [E, D, 2F] (each tensor shard holds its own slices' concatenation), its transpose and
    scales; down [E, F, D], its transpose and scales."""
    gate_up, down = P(EXPERT, None, tensor), P(EXPERT, tensor, None)
    return dispatch.ExpertBlocks(WeightBlocks(gate_up, down, gate_up), WeightBlocks(down, gate_up, down))


def tensor_axis(mesh):
    """The mesh axis the experts' width F is split over, or None."""
    return TENSOR if TENSOR in mesh.axis_names and mesh.shape[TENSOR] > 1 else None


def routed_experts(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, config: ModelConfig, mesh,
                   blocks=None):
    """dispatch.routed_experts over `mesh`: (y [N, D] float32, dropped pairs int32). `blocks`: the
    weights' dispatch.ExpertBlocks, split by `block_specs` (dropless only), or None."""
    moe = config.moe
    n, k = ids_NK.shape
    e = w_gate_EDF.shape[0]
    s = mesh.shape[EXPERT]
    if e % s:
        raise ValueError(f"config field 'model.moe.n_routed_experts': {e} experts do not divide over "
                         f"mesh axis 'expert' of size {s}")
    batch_axes = tuple(a for a in BATCH if a in mesh.axis_names)
    tensor = tensor_axis(mesh)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    pad = -n % shards
    if pad:
        x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
        ids_NK = jnp.pad(ids_NK, ((0, pad), (0, 0)), constant_values=-1)
        weights_NK = jnp.pad(weights_NK, ((0, pad), (0, 0)))
    cap = None
    if moe.dispatch == "capacity":
        n_slice = n / mesh.shape.get("data", 1)
        cap = max(1, math.ceil(moe.capacity_factor * n_slice * k / e))
    dispatch.check_blocks(blocks, moe.dispatch)
    local = functools.partial(_local, config=config, num_shards=s, cap=cap, tensor=tensor, batch_axes=batch_axes)
    tokens = P(batch_axes, None)
    y_ND, dropped = jax.shard_map(
        local, mesh=mesh,
        in_specs=(tokens, tokens, tokens, *weight_specs(tensor), None if blocks is None else block_specs(tensor)),
        out_specs=(tokens, P()), check_vma=False,
    )(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, blocks)
    return y_ND[:n], dropped


def _local(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, blocks, *, config, num_shards, cap, tensor,
           batch_axes):
    """One device: dispatch, exchange, compute, exchange back, combine."""
    n, k = ids_NK.shape
    s, e_l = num_shards, w_gate_EDF.shape[0]
    moe = config.moe
    max_pairs = (math.ceil(moe.ep_pair_capacity * n * k)
                 if moe.dispatch == "dropless" and moe.ep_pair_capacity > 0 else None)
    experts = functools.partial(_compute, w_gate_EDF=w_gate_EDF, w_up_EDF=w_up_EDF, w_down_EFD=w_down_EFD,
                                blocks=blocks, cap=cap, max_pairs=max_pairs, grouped_gemm=config.moe.grouped_gemm,
                                fp8=dispatch.fp8_backend(config))
    shard_NK = jnp.where(ids_NK >= 0, ids_NK // e_l, -1)
    on_NSK = shard_NK[:, None, :] == jnp.arange(s)[None, :, None]
    to_NS = on_NSK.any(-1)
    # Per (token, destination): k local ids (e_l = not there) and gate weights (0 = not there).
    meta_NSX = jnp.concatenate([jnp.where(on_NSK, ids_NK[:, None, :] - shard_NK[:, None, :] * e_l, e_l)
                                .astype(jnp.float32), jnp.where(on_NSK, weights_NK[:, None, :], 0.0)], -1)
    empty_X = jnp.concatenate([jnp.full((k,), e_l, jnp.float32), jnp.zeros((k,), jnp.float32)])
    meta_NSX = jnp.concatenate([meta_NSX, jnp.broadcast_to(empty_X, (1, s, 2 * k))])  # row n: nothing
    x_ND1 = jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])

    if s == 1:
        out_RD, dropped = experts(x_ND, meta_NSX[:n, 0])
        y_ND = out_RD
    elif config.moe.expert_parallel == "all_to_all":
        y_ND, dropped = _exchange_fixed(x_ND1, meta_NSX, to_NS, experts)
    else:
        y_ND, dropped = _exchange_ragged(x_ND1, meta_NSX, to_NS, experts, empty_X, min(s, k))
    if tensor is not None:
        y_ND = jax.lax.psum(y_ND, tensor)
    return y_ND, jax.lax.psum(dropped, batch_axes)


def _exchange_fixed(x_ND1, meta_NSX, to_NS, experts):
    """all_to_all of [S·N] row buffers: row s·N + p carries the p-th token sent to shard s."""
    n, s = to_NS.shape
    pos_NS = jnp.cumsum(to_NS, axis=0) - 1
    slot_NS = jnp.where(to_NS, jnp.arange(s) * n + pos_NS, s * n)  # s·N: discarded
    token_NS = jnp.broadcast_to(jnp.arange(n)[:, None], (n, s))
    src_R = jnp.full((s * n + 1,), n, jnp.int32).at[slot_NS.reshape(-1)].set(token_NS.reshape(-1))[:-1]
    send_RD = jnp.take(x_ND1, src_R, axis=0)
    send_RX = meta_NSX[src_R, jnp.arange(s * n) // n]
    a2a = functools.partial(jax.lax.all_to_all, axis_name=EXPERT, split_axis=0, concat_axis=0, tiled=True)
    out_RD, dropped = experts(*saved((a2a(send_RD), a2a(send_RX)), EXCHANGED))
    back_RD = a2a(out_RD.astype(x_ND1.dtype)).astype(jnp.float32)
    return jax.ops.segment_sum(back_RD, src_R, num_segments=n + 1)[:n], dropped


def _exchange_ragged(x_ND1, meta_NSX, to_NS, experts, empty_X, max_shards_per_token):
    """ragged_all_to_all of the rows sent only, received at the fixed buffers' offsets (s·N)."""
    n, s = to_NS.shape
    p = n * max_shards_per_token  # rows a device can send
    to_F = to_NS.T.reshape(-1)  # destination-major: sorted by destination, then token
    rank_F = jnp.where(to_F, jnp.cumsum(to_F) - 1, p)
    src_P = jnp.full((p + 1,), n, jnp.int32).at[rank_F].set(jnp.tile(jnp.arange(n, dtype=jnp.int32), s))[:-1]
    dst_P = jnp.zeros((p + 1,), jnp.int32).at[rank_F].set(jnp.repeat(jnp.arange(s, dtype=jnp.int32), n))[:-1]
    send_sizes_S = to_NS.sum(0).astype(jnp.int32)
    send_offsets_S = (jnp.cumsum(send_sizes_S) - send_sizes_S).astype(jnp.int32)
    a2a = functools.partial(jax.lax.all_to_all, axis_name=EXPERT, split_axis=0, concat_axis=0, tiled=True)
    recv_sizes_S = a2a(send_sizes_S)
    me = jax.lax.axis_index(EXPERT)
    chunk_offsets_S = (jnp.arange(s) * n).astype(jnp.int32)  # where source i's rows sit on any receiver
    there_S = jnp.full((s,), me * n, jnp.int32)  # where this device's rows land on each destination
    ragged = functools.partial(jax.lax.ragged_all_to_all, axis_name=EXPERT)
    recv_RD = ragged(jnp.take(x_ND1, src_P, axis=0), jnp.zeros((s * n, x_ND1.shape[1]), x_ND1.dtype),
                     send_offsets_S, send_sizes_S, there_S, recv_sizes_S)
    recv_RX = ragged(meta_NSX[src_P, dst_P], jnp.broadcast_to(empty_X, (s * n, empty_X.shape[0])),
                     send_offsets_S, send_sizes_S, there_S, recv_sizes_S)
    out_RD, dropped = experts(*saved((recv_RD, recv_RX), EXCHANGED))
    back_PD = ragged(out_RD.astype(x_ND1.dtype), jnp.zeros((p, x_ND1.shape[1]), x_ND1.dtype),
                     chunk_offsets_S, recv_sizes_S, a2a(send_offsets_S), send_sizes_S)
    return jax.ops.segment_sum(back_PD.astype(jnp.float32), src_P, num_segments=n + 1)[:n], dropped


def _compute(x_RD, meta_RX, *, w_gate_EDF, w_up_EDF, w_down_EFD, blocks, cap, max_pairs, grouped_gemm, fp8):
    """Local experts on received rows: per row, sum over its local slots of gate · FFN_e(x_row)."""
    r, k = x_RD.shape[0], meta_RX.shape[1] // 2
    e_l = w_gate_EDF.shape[0]
    ids_F = jnp.round(meta_RX[:, :k]).astype(jnp.int32).reshape(-1)  # e_l: not for this shard
    m = r * min(k, e_l)  # a row holds at most min(k, E_l) distinct local experts
    overflow = jnp.zeros((), jnp.int32)
    if max_pairs is not None and max_pairs < m:  # keep the first max_pairs real pairs to arrive
        m = max_pairs
        real_F = ids_F < e_l
        keep_F = real_F & (jnp.cumsum(real_F) <= m)
        overflow = (real_F & ~keep_F).sum().astype(jnp.int32)
        ids_F = jnp.where(keep_F, ids_F, e_l)
    order_M = jnp.argsort(ids_F, stable=True)[:m]
    ids_M, row_M = ids_F[order_M], order_M // k
    real_M = ids_M < e_l  # the real pairs come first; the rest pads the static worst case
    group_sizes_E = jnp.zeros((e_l + 1,), jnp.int32).at[ids_F].add(1)[:e_l]
    if cap is None:
        # Padding pairs lie past the groups, where the grouped GEMMs leave garbage ("unread": no
        # zeroing pass over the worst-case buffer); it is kept out of the combine here and out of
        # the gather's gradient by _gather_rows.
        x_MD = _gather_rows(x_RD, row_M, real_M, r)
        y_MD = dispatch.ffn_grouped(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, grouped_gemm,
                                    past_groups="unread", fp8=fp8, blocks=blocks)
        y_MD = jnp.where(real_M[:, None], y_MD, jnp.zeros((), y_MD.dtype))
        dropped = overflow
    else:  # first `cap` pairs of each expert in arrival order = token order within the data slice
        x_MD = jnp.take(x_RD, row_M, axis=0)
        starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
        rank_M = jnp.arange(m) - starts_E[jnp.minimum(ids_M, e_l - 1)]
        keep_M = real_M & (rank_M < cap)
        slot_M = jnp.where(keep_M, ids_M * cap + rank_M, e_l * cap)
        y_MD = dispatch.capacity_ffn(x_MD, slot_M, cap, w_gate_EDF, w_up_EDF, w_down_EFD)
        dropped = (real_M & ~keep_M).sum().astype(jnp.int32)
    gate_M = meta_RX[:, k:].reshape(-1)[order_M]
    return jax.ops.segment_sum(y_MD * gate_M[:, None], row_M, num_segments=r), dropped


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_rows(x_RD, row_M, real_M, num_rows: int):
    """x_RD[row_M], whose gradient sums only the real pairs' rows back (padding pairs' gradients,
    which the grouped GEMMs leave unwritten, never reach x)."""
    return jnp.take(x_RD, row_M, axis=0)


def _gather_rows_fwd(x_RD, row_M, real_M, num_rows):
    return _gather_rows(x_RD, row_M, real_M, num_rows), (row_M, real_M)


def _gather_rows_bwd(num_rows, res, g_MD):
    row_M, real_M = res
    g_MD = jnp.where(real_M[:, None], g_MD, jnp.zeros((), g_MD.dtype))
    return jax.ops.segment_sum(g_MD, row_M, num_segments=num_rows), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)

"""Routed-expert computation behind one interface: `routed_experts(x, ids, weights, w..., config)`.

    y_n = sum_k weight_{n,k} * FFN_{e(n,k)}(x_n),   FFN_e(x) = (silu(x W_gate,e) * x W_up,e) W_down,e

Backends (config.moe.dispatch):
- "dense": every expert on every token, masked — O(N·E) compute; the plain reference for tests.
- "dropless": sort the N·k (token, expert) pairs by expert, grouped GEMMs over the contiguous
  groups (`grouped_gemm.gmm`: jax.lax.ragged_dot, or the Pallas Mosaic GPU kernels by
  config.moe.grouped_gemm; with fp8 "block", DeepSeek-V3's block-scaled FP8 grouped GEMMs,
  `dsjax.fp8.gmm_block`), weighted combine, unsort. No token is ever dropped.
- "capacity": fixed [E, capacity] buffers (capacity = ceil(capacity_factor · N·k / E)); pairs past
  an expert's capacity are dropped (in token order) and counted; static shapes throughout.

Expert parallelism over the mesh's 'expert' axis (`expert_parallel.py`) moves tokens to the shard
holding their experts and runs the same grouped FFN (`ffn_grouped`, `capacity_ffn`) there.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.fp8 import gmm_block
from dsjax.fp8.dot import BLOCK as FP8_BLOCK
from dsjax.fp8.quantize_kernel import WeightBlocks
from dsjax.model.grouped_gemm import gmm
from dsjax.remat_names import SAVED_GEMM, saved


class ExpertBlocks(NamedTuple):
    """The experts' FP8 weights made before the layer (dsjax.model.fp8_weights): the 128x128 blocks of
    [w_gate | w_up] (one GEMM) and of w_down."""

    gate_up: WeightBlocks
    down: WeightBlocks


def check_blocks(blocks: Optional[ExpertBlocks], kind: str) -> None:
    """FP8 weight blocks serve dropless dispatch only (its grouped GEMMs); anything else would ignore them."""
    if blocks is not None and kind != "dropless":
        raise ValueError(f"routed_experts: FP8 weight blocks serve dropless dispatch only, not "
                         f"model.moe.dispatch={kind!r}")


def fp8_backend(config: ModelConfig) -> Optional[str]:
    """The kernel backend of the experts' block-scaled FP8 GEMMs, or None when they run in the
    compute dtype (fp8 'none'; 'tensor' is XLA's per-tensor FP8 for dense layers only)."""
    return config.kernel_backend if config.fp8 == "block" else None


def ffn_grouped(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, grouped_gemm: str = "xla",
                past_groups: str = "zeroed", fp8: Optional[str] = None, blocks: Optional[ExpertBlocks] = None):
    """SwiGLU experts over rows sorted into contiguous expert groups. `past_groups` says what the
    caller knows of the rows past sum(group_sizes):
      "zeroed"  they may exist and come back as 0 (the grouped GEMMs zero them: select passes);
      "absent"  there are none (single-device dropless): nothing to zero;
      "unread"  they exist, but the caller never reads their output nor lets their gradient reach
                anything (expert_parallel's padding pairs): the GEMMs skip zeroing them, and gate
                and up are zeroed there inside the SwiGLU's elementwise pass instead (a select
                fused into it, whose gradient is a select too), so h and the gate/up gradient stay
                finite everywhere, as the weight-gradient kernels need (they zero a neighbouring
                group's rows by multiplying); the output's rows there are garbage.
    Outputs in x's dtype: the GEMMs accumulate in float32 and round once, and the SwiGLU product
    is taken in float32. With `fp8` (a kernel backend, see `fp8_backend`) the GEMMs are
    DeepSeek-V3's block-scaled FP8 (dsjax.fp8.gmm_block), and gate and up run as one [E, D, 2F]
    GEMM when F is a multiple of 128: x and its wgrad tiles are quantized once instead of twice.
    The 128x128 weight blocks and 1x128 tiles are then exactly those of the two separate GEMMs, and
    the weights are never concatenated (gmm_block takes them as a tuple: the Pallas weights' kernel
    reads each block from whichever holds it; a concatenated copy cost 2.4 ms per configs/small.py
    FP8 step on an H200). `blocks`: those weights already quantized (`ExpertBlocks`, made once
    before the layer scan; fp8 only, F a multiple of 128), so that no weight is quantized here."""
    if past_groups not in ("zeroed", "absent", "unread"):
        raise ValueError(f"ffn_grouped: past_groups={past_groups!r} is not 'zeroed', 'absent' or 'unread'")
    covered = past_groups != "zeroed"
    f = w_gate_EDF.shape[-1]
    if blocks is not None and (fp8 is None or f % FP8_BLOCK):
        raise ValueError(f"ffn_grouped: FP8 weight blocks need fp8 block GEMMs and an expert width that is a "
                         f"multiple of {FP8_BLOCK} (fp8={fp8!r}, width {f})")

    def gemm(a_MK, w_EKN, w_blocks=None):  # saved by remat (remat_names.SAVED_GEMM); fp8 also takes a tuple
        if fp8 is None:
            y_MN = gmm(a_MK, w_EKN, group_sizes_E, grouped_gemm, out_dtype=x_MD.dtype, covered=covered)
        else:
            y_MN = gmm_block(a_MK, w_EKN, group_sizes_E, fp8, out_dtype=x_MD.dtype, covered=covered,
                             blocks=w_blocks)
        return saved(y_MN, SAVED_GEMM)

    if fp8 is not None and f % FP8_BLOCK == 0:
        # one GEMM over [w_gate | w_up], not materialized
        gate_up_MX = gemm(x_MD, (w_gate_EDF, w_up_EDF), None if blocks is None else blocks.gate_up)
        # split, not two slices: their gradient is one concatenation, where slices' is two zero-padded
        # copies added (0.64 vs ~0.4 ms per configs/small.py MoE layer on an H200)
        gate_MF, up_MF = jnp.split(gate_up_MX, [f], axis=1)
    else:
        gate_MF, up_MF = gemm(x_MD, w_gate_EDF), gemm(x_MD, w_up_EDF)
    gate_MF, up_MF = gate_MF.astype(jnp.float32), up_MF.astype(jnp.float32)
    if past_groups == "unread":
        in_group_M1 = (jnp.arange(x_MD.shape[0]) < group_sizes_E.sum())[:, None]
        gate_MF, up_MF = jnp.where(in_group_M1, gate_MF, 0.0), jnp.where(in_group_M1, up_MF, 0.0)
    h_MF = (jax.nn.silu(gate_MF) * up_MF).astype(x_MD.dtype)
    return gemm(h_MF, w_down_EFD, None if blocks is None else blocks.down)


def dense(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
    e = w_gate_EDF.shape[0]
    gate_NEF = jnp.einsum("ND,EDF->NEF", x_ND, w_gate_EDF, preferred_element_type=jnp.float32)
    up_NEF = jnp.einsum("ND,EDF->NEF", x_ND, w_up_EDF, preferred_element_type=jnp.float32)
    h_NEF = (jax.nn.silu(gate_NEF) * up_NEF).astype(x_ND.dtype)
    y_NED = jnp.einsum("NEF,EFD->NED", h_NEF, w_down_EFD, preferred_element_type=jnp.float32)
    combine_NE = (jax.nn.one_hot(ids_NK, e, dtype=jnp.float32) * weights_NK[..., None]).sum(1)
    return jnp.einsum("NED,NE->ND", y_NED, combine_NE), jnp.zeros((), jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def sort_rows(x_ND, order_M, inverse_M, k: int):
    """Row i of the result is token order_M[i] // k: the (token, slot) pairs in expert order, [N·k, D].

    A gather both ways: the gradient gathers back by the inverse permutation and sums each token's
    k copies, where autodiff of a gather would scatter-add into [N, D]."""
    return jnp.take(x_ND, order_M // k, axis=0)


def _sort_rows_fwd(x_ND, order_M, inverse_M, k):
    return sort_rows(x_ND, order_M, inverse_M, k), (order_M, inverse_M)


def _sort_rows_bwd(k, res, g_MD):
    _, inverse_M = res
    g_NKD = jnp.take(g_MD, inverse_M, axis=0).reshape(inverse_M.shape[0] // k, k, -1)
    return g_NKD.astype(jnp.float32).sum(1).astype(g_MD.dtype), None, None


sort_rows.defvjp(_sort_rows_fwd, _sort_rows_bwd)


@jax.custom_vjp
def unsort_rows(y_MD, order_M, inverse_M):
    """Expert-ordered rows back in (token, slot) order: y_MD[inverse_M]; the gradient is the gather
    y[order_M] (a permutation), not autodiff's scatter."""
    return jnp.take(y_MD, inverse_M, axis=0)


def _unsort_rows_fwd(y_MD, order_M, inverse_M):
    return unsort_rows(y_MD, order_M, inverse_M), (order_M, inverse_M)


def _unsort_rows_bwd(res, g_MD):
    order_M, _ = res
    return jnp.take(g_MD, order_M, axis=0), None, None


unsort_rows.defvjp(_unsort_rows_fwd, _unsort_rows_bwd)


def dropless(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, grouped_gemm: str = "xla",
             fp8: Optional[str] = None, blocks: Optional[ExpertBlocks] = None):
    n, k = ids_NK.shape
    e = w_gate_EDF.shape[0]
    flat_ids_M = ids_NK.reshape(-1)
    order_M = jnp.argsort(flat_ids_M, stable=True).astype(jnp.int32)
    inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(n * k, dtype=jnp.int32))
    x_MD = sort_rows(x_ND, order_M, inverse_M, k)
    group_sizes_E = jnp.bincount(flat_ids_M, length=e).astype(jnp.int32)
    y_MD = ffn_grouped(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, grouped_gemm, past_groups="absent",
                       fp8=fp8, blocks=blocks)
    y_MD = unsort_rows(y_MD, order_M, inverse_M)  # back to (token, slot) order
    y_ND = (y_MD.reshape(n, k, -1).astype(jnp.float32) * weights_NK[..., None]).sum(1)
    return y_ND, jnp.zeros((), jnp.int32)


def capacity_slots(ids_NK, num_experts: int, capacity: int):
    """Each (token, slot) pair's position in its expert's buffer and whether it fits."""
    one_hot_MK = jax.nn.one_hot(ids_NK.reshape(-1), num_experts, dtype=jnp.int32)
    position_M = (jnp.cumsum(one_hot_MK, axis=0) * one_hot_MK).sum(-1) - 1
    return position_M, position_M < capacity


def capacity(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, capacity_factor: float):
    n, k = ids_NK.shape
    e, d = w_gate_EDF.shape[0], x_ND.shape[1]
    cap = max(1, math.ceil(capacity_factor * n * k / e))
    flat_ids_M = ids_NK.reshape(-1)
    position_M, keep_M = capacity_slots(ids_NK, e, cap)
    slot_M = jnp.where(keep_M, flat_ids_M * cap + position_M, e * cap)  # overflow -> a discarded row
    y_MD = capacity_ffn(jnp.repeat(x_ND, k, axis=0), slot_M, cap, w_gate_EDF, w_up_EDF, w_down_EFD)
    y_ND = (y_MD.reshape(n, k, d) * weights_NK[..., None]).sum(1)
    return y_ND, (~keep_M).sum().astype(jnp.int32)


def capacity_ffn(x_MD, slot_M, cap: int, w_gate_EDF, w_up_EDF, w_down_EFD):
    """SwiGLU experts on fixed [E, cap] buffers: row m goes to flat slot slot_M[m] (E·cap discards
    it, and its output is 0); returns each row's output [M, D] float32."""
    e, d = w_gate_EDF.shape[0], x_MD.shape[1]
    buf_XD = jnp.zeros((e * cap + 1, d), x_MD.dtype).at[slot_M].set(x_MD)
    buf_ECD = buf_XD[:-1].reshape(e, cap, d)
    gate_ECF = jnp.einsum("ECD,EDF->ECF", buf_ECD, w_gate_EDF, preferred_element_type=jnp.float32)
    up_ECF = jnp.einsum("ECD,EDF->ECF", buf_ECD, w_up_EDF, preferred_element_type=jnp.float32)
    h_ECF = (jax.nn.silu(gate_ECF) * up_ECF).astype(x_MD.dtype)
    out_ECD = jnp.einsum("ECF,EFD->ECD", h_ECF, w_down_EFD, preferred_element_type=jnp.float32)
    out_XD = jnp.concatenate([out_ECD.reshape(e * cap, d), jnp.zeros((1, d), out_ECD.dtype)])
    return jnp.take(out_XD, slot_M, axis=0)


def routed_experts(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, config: ModelConfig,
                   blocks: Optional[ExpertBlocks] = None):
    """(y [N, D] float32, number of dropped (token, expert) pairs). `blocks`: see ffn_grouped
    (dropless dispatch only)."""
    kind = config.moe.dispatch
    check_blocks(blocks, kind)
    if kind == "dense":
        return dense(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD)
    if kind == "capacity":
        return capacity(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, config.moe.capacity_factor)
    return dropless(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, config.moe.grouped_gemm,
                    fp8_backend(config), blocks)

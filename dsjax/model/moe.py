"""The DeepSeekMoE layer (DeepSeek-V3 §2.1.2): shared experts + routed fine-grained experts.

    h' = h + sum_i FFN_shared_i(h) + sum_{e in TopK} g_e FFN_e(h)

The n_shared_experts shared experts are one SwiGLU of width n_shared_experts · moe_intermediate_size
(as the official checkpoints store them). Routed experts go through `dispatch.routed_experts`, or,
under a mesh with an 'expert' axis > 1 (or a Pallas grouped GEMM on several devices), through
`expert_parallel.routed_experts` (shard_map, all-to-all token exchange); loads are counted here
from the ids either way.

Besides its output the layer returns `MoEStats`: tokens per expert (the load that drives the
aux-loss-free bias update) and the sequence-wise balance loss (V3 eqs. 17-20)

    L_bal = sum_i f_i P_i,  f_i = E/(k·T) · #{t : i in TopK(t)},  P_i = 1/T · sum_t s'_{i,t}

per row, averaged over rows, counting only real tokens (segment id != 0); and the chosen expert
ids, which GRPO records for router replay. Passing `replay_ids` forces those experts (gate
weights are still computed from the current scores, so the router keeps its gradient).

With fp8 "block", the experts' weights may arrive already quantized in the variables' "fp8"
collection (`compute_variables` puts them there, model/fp8_weights.py); the layer then quantizes
none itself.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.config import ModelConfig
from dsjax.fp8.quantize_kernel import WeightBlocks
from dsjax.model import dispatch, expert_parallel
from dsjax.model.fp8_weights import FP8_COLLECTION
from dsjax.model.layers import SwiGLU, dtype_of, init_normal
from dsjax.model.router import Router


class MoEStats(NamedTuple):
    load_E: jax.Array  # float32 tokens routed to each expert (real tokens only)
    balance_loss: jax.Array  # float32 scalar, sequence-wise balance loss (without α)
    dropped: jax.Array  # int32 pairs dropped by capacity dispatch or `ep_pair_capacity` (0 when dropless)
    expert_ids_BTK: jax.Array  # int32 chosen experts


class MoE(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, segment_ids_BT, replay_ids_BTK: Optional[jax.Array] = None):
        c = self.config
        moe = c.moe
        b, t, d = x_BTD.shape
        e, f, k = moe.n_routed_experts, moe.moe_intermediate_size, moe.num_experts_per_tok
        dtype = dtype_of(c.dtype)
        x_ND = x_BTD.reshape(b * t, d)

        replay_NK = None if replay_ids_BTK is None else replay_ids_BTK.reshape(b * t, k)
        routing = Router(c, name="router")(x_ND, replay_NK)
        ids_NK, weights_NK = routing.expert_ids_NK, routing.weights_NK

        def expert_weight(name, shape, names):
            return self.param(name, nn.with_logical_partitioning(init_normal(c), names), shape,
                              dtype_of(c.param_dtype)).astype(dtype)

        w_gate_EDF = expert_weight("gate", (e, d, f), ("expert", "expert_embed", "expert_mlp"))
        w_up_EDF = expert_weight("up", (e, d, f), ("expert", "expert_embed", "expert_mlp"))
        w_down_EFD = expert_weight("down", (e, f, d), ("expert", "expert_mlp", "expert_embed"))
        blocks = None  # FP8 weights quantized before the layer scan (model/fp8_weights.py), when given
        if self.has_variable(FP8_COLLECTION, "gate_up"):
            blocks = dispatch.ExpertBlocks(WeightBlocks(*self.get_variable(FP8_COLLECTION, "gate_up")),
                                           WeightBlocks(*self.get_variable(FP8_COLLECTION, "down")))
        mesh = expert_parallel.mesh_for(c)
        if mesh is None:
            routed_ND, dropped = dispatch.routed_experts(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF,
                                                         w_down_EFD, c, blocks)
        else:
            routed_ND, dropped = expert_parallel.routed_experts(x_ND, ids_NK, weights_NK, w_gate_EDF, w_up_EDF,
                                                                w_down_EFD, c, mesh, blocks)
        y_BTD = routed_ND.reshape(b, t, d).astype(dtype)
        if moe.n_shared_experts:
            y_BTD = y_BTD + SwiGLU(f * moe.n_shared_experts, c, name="shared")(x_BTD)

        valid_BT = (segment_ids_BT != 0).astype(jnp.float32)
        chosen_BTE = jax.nn.one_hot(ids_NK, e, dtype=jnp.float32).sum(1).reshape(b, t, e) * valid_BT[..., None]
        load_E = chosen_BTE.sum((0, 1))
        tokens_B = jnp.maximum(valid_BT.sum(1), 1.0)
        f_BE = chosen_BTE.sum(1) * e / (k * tokens_B[:, None])
        p_BE = (routing.affinity_NE.reshape(b, t, e) * valid_BT[..., None]).sum(1) / tokens_B[:, None]
        has_tokens_B = (valid_BT.sum(1) > 0).astype(jnp.float32)
        balance = ((f_BE * p_BE).sum(-1) * has_tokens_B).sum() / jnp.maximum(has_tokens_B.sum(), 1.0)
        stats = MoEStats(load_E, balance, dropped, ids_NK.reshape(b, t, k))
        return y_BTD, stats


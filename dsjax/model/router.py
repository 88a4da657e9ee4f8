"""The DeepSeekMoE router, in float32.

V3 (DeepSeek-V3 §2.1.2, eqs. 13-16): s = sigmoid(u W_r); selection uses s + b, where b is the
aux-loss-free balancing bias (`e_score_correction_bias`), kept in the non-trainable `router`
collection and nudged outside the optimizer; groups are ranked by the sum of their top-2 biased
scores, the best `topk_group` groups are kept (the rest masked with -inf, as DeepSeek's model.py
does), and the top `num_experts_per_tok` experts are chosen from those. Gate weights are the
*unbiased* scores of the chosen experts, divided by their sum when norm_topk_prob, times
routed_scaling_factor.

V2 (DeepSeek-V2 §2.2): s = softmax(u W_r); `greedy` takes the global top-k, `group_limited_greedy`
ranks groups by their max score first. Gate weights are the chosen softmax scores times
routed_scaling_factor (norm_topk_prob is rejected by config validation for V2).

The router also returns what the sequence-wise balance loss (V3 eqs. 17-20) needs: the
normalized affinities s / sum(s) over all experts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.config import ModelConfig
from dsjax.model.layers import dtype_of, init_normal


class Routing(NamedTuple):
    expert_ids_NK: jax.Array  # int32 chosen experts per token
    weights_NK: jax.Array  # float32 gate weights
    affinity_NE: jax.Array  # float32 s / sum(s): the balance loss's P_i term


def gate_weights(scores_NE, ids_NK, config: ModelConfig):
    """The chosen experts' unbiased scores, normalized when norm_topk_prob, times the scaling."""
    weights_NK = jnp.take_along_axis(scores_NE, ids_NK, axis=1)
    if config.moe.norm_topk_prob:
        weights_NK = weights_NK / (weights_NK.sum(-1, keepdims=True) + 1e-20)
    return weights_NK * config.moe.routed_scaling_factor


def select(scores_NE, bias_E, config: ModelConfig) -> jax.Array:
    """Expert ids [N, k]: group-limited top-k over the (biased, for noaux_tc) scores."""
    moe = config.moe
    n, e = scores_NE.shape
    k = moe.num_experts_per_tok
    choice_NE = scores_NE + bias_E if moe.topk_method == "noaux_tc" else scores_NE
    if moe.topk_method != "greedy" and moe.n_group > 1:
        grouped_NGX = choice_NE.reshape(n, moe.n_group, e // moe.n_group)
        if moe.topk_method == "noaux_tc":
            group_score_NG = jax.lax.top_k(grouped_NGX, 2)[0].sum(-1)
        else:
            group_score_NG = grouped_NGX.max(-1)
        _, keep_NK = jax.lax.top_k(group_score_NG, moe.topk_group)
        keep_NG = jnp.zeros((n, moe.n_group), bool).at[jnp.arange(n)[:, None], keep_NK].set(True)
        choice_NE = jnp.where(jnp.repeat(keep_NG, e // moe.n_group, axis=1), choice_NE, -jnp.inf)
    return jax.lax.top_k(choice_NE, k)[1].astype(jnp.int32)


class Router(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_ND, replay_ids_NK=None) -> Routing:
        """Routes tokens; `replay_ids_NK` (router replay) forces the experts, weights stay live."""
        c = self.config
        e = c.moe.n_routed_experts
        w_DE = self.param("kernel", nn.with_logical_partitioning(init_normal(c), ("embed", None)),
                          (c.hidden_size, e), dtype_of(c.param_dtype))
        bias_E = self.variable("router", "bias",
                               nn.with_logical_partitioning(lambda: jnp.zeros((e,), jnp.float32), (None,))).value
        logits_NE = jnp.dot(x_ND.astype(jnp.float32), w_DE.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        if c.moe.scoring_func == "sigmoid":
            scores_NE = jax.nn.sigmoid(logits_NE)
        else:
            scores_NE = jax.nn.softmax(logits_NE, axis=-1)
        if replay_ids_NK is None:
            ids_NK = select(jax.lax.stop_gradient(scores_NE), bias_E, c)
        else:
            ids_NK = replay_ids_NK.astype(jnp.int32)
        weights_NK = gate_weights(scores_NE, ids_NK, c)
        affinity_NE = scores_NE / scores_NE.sum(-1, keepdims=True)
        return Routing(ids_NK, weights_NK, affinity_NE)

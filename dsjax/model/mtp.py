"""Multi-token prediction modules (DeepSeek-V3 §2.2, eqs. 21-25).

Module k (1-based) predicts token t_{i+k+1} at position i from the previous depth's hidden state
h_i^{k-1} and the embedding of token t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i^{k-1})])     (embedding first, as the
                                                                   official checkpoints lay it out)
    h_i^k = TRM_k(h'_i)        one full decoder layer (MLA + MoE)
    P^k   = OutHead(norm_k(h_i^k))    norm_k is the checkpoints' shared_head.norm

Embedding and output head are the main model's. h^0 is the main model's last hidden state
*after* its final norm: DeepSeek's shipped modeling_deepseek.py and vLLM's deepseek_mtp.py hand
that tensor to the MTP layer, and the official weights were trained with it. Depth k > 1 takes
h^{k-1}, the previous module's block output (before its norm).

Training (dsjax): tokens are shifted left by k inside the model (the tail is padding), and the
loss masks position i unless t_{i+k+1} lies in the same packed segment as t_i. Serving engines
zero the embedding at position 0 as part of their token shift; training needs no such detail.
"""

from __future__ import annotations

from flax import linen as nn

from dsjax.config import ModelConfig
from dsjax.model.decoder import DecoderLayer
from dsjax.model.layers import Dense, RMSNorm

import jax.numpy as jnp


class MTPModule(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, h_prev_BTD, emb_BTD, positions_BT, segment_ids_BT, view=None, cache=None,
                 replay_ids_BTK=None):
        c = self.config
        d = c.hidden_size
        joined_BTX = jnp.concatenate([RMSNorm(d, c, name="enorm")(emb_BTD), RMSNorm(d, c, name="hnorm")(h_prev_BTD)],
                                     axis=-1)
        h_BTD = Dense((2 * d,), (d,), (None, "embed"), c, name="eh_proj")(joined_BTX)
        h_BTD, new_cache, stats = DecoderLayer(c, moe=c.moe.n_routed_experts > 0, name="layer")(
            h_BTD, positions_BT, segment_ids_BT, view, cache, replay_ids_BTK)
        return h_BTD, RMSNorm(d, c, name="norm")(h_BTD), new_cache, stats

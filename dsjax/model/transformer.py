"""The DeepSeek-V3 transformer: embedding, dense + MoE decoder stacks, final norm, untied output
head, and the MTP modules.

`Transformer(config).apply(variables, tokens)` returns float32 logits [B, T, V]. With
`full_output=True` it returns a `ModelOutput` with everything a trainer or a decoder needs: MTP
logits, per-layer MoE statistics, the final hidden state and the updated latent cache. Nothing
changes behind the caller's back: the router bias lives in the `router` collection and is only
read here.

`compute_variables(config, variables)` casts the parameters once to what the layers compute with
(the compute dtype), leaving the float32 islands — router kernels, norm scales and the router
collection (the selection bias) — as they are. Every
layer casts its weights itself too, so applying the model to the result gives the same numbers;
callers do it once outside the layer scans, so that neither the scan nor rematerialization nor a
decode loop repeats the float32 -> bf16 pass over every weight. With fp8 "block" it also quantizes
the routed experts' weights into FP8 blocks there, once (model/fp8_weights.py: collection "fp8").
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.config import ModelConfig
from dsjax.model.decoder import LayerStack
from dsjax.model.fp8_weights import FP8_COLLECTION, expert_blocks
from dsjax.model.layers import Dense, Embed, RMSNorm
from dsjax.model.mla import CacheView, LayerCache, write_entries
from dsjax.model.moe import MoEStats
from dsjax.model.mtp import MTPModule


FLOAT32_ISLANDS = ("router", "scale")  # module / parameter names the model computes in float32


def compute_variables(config: ModelConfig, variables: dict) -> dict:
    """`variables` with every floating parameter wider than the compute dtype cast to it, except the
    float32 islands (any leaf under a module named 'router', every norm 'scale'); collections other
    than 'params' are returned as they are."""
    dtype = jnp.dtype(config.dtype)

    def cast(path, x):
        names = {str(getattr(k, "key", k)) for k in path}
        wider = jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > dtype.itemsize
        return x.astype(dtype) if wider and not names & set(FLOAT32_ISLANDS) else x

    out = {**variables, "params": jax.tree_util.tree_map_with_path(cast, variables["params"])}
    blocks = expert_blocks(config, variables["params"])  # fp8 "block": the experts' FP8 weights, made here once
    if blocks:
        out[FP8_COLLECTION] = blocks
    return out


class ModelCache(NamedTuple):
    """Latent caches, stacked per stack [L, B, S, ...]; `mtp` holds one LayerCache per module."""

    dense: Optional[LayerCache]
    moe: Optional[LayerCache]
    mtp: tuple


class ReplayIds(NamedTuple):
    """Chosen experts per MoE layer [L, B, T, k] and per MTP module [B, T, k] (router replay)."""

    moe: Optional[jax.Array]
    mtp: tuple


class ModelOutput(NamedTuple):
    logits: jax.Array  # float32 [B, T, V]
    mtp_logits: tuple  # per depth k: float32 [B, T, V], predicting t_{i+k+1}
    moe_stats: Optional[MoEStats]  # main MoE layers, stacked [L_moe, ...]
    mtp_stats: tuple  # per depth: MoEStats or None
    hidden: jax.Array  # [B, T, D] after the final norm (the MTP input)
    cache: Optional[ModelCache]


def shift_left(x_BT, k: int, fill=0):
    """x[:, i + k] at position i; the last k positions get `fill`."""
    if k == 0:
        return x_BT
    return jnp.concatenate([x_BT[:, k:], jnp.full((x_BT.shape[0], k), fill, x_BT.dtype)], axis=1)


class Transformer(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        self.embed = Embed(c)
        self.dense_stack = LayerStack(c, False, c.num_dense_layers) if c.num_dense_layers else None
        self.moe_stack = LayerStack(c, True, c.num_moe_layers) if c.num_moe_layers else None
        self.final_norm = RMSNorm(c.hidden_size, c)
        self.head = Dense((c.hidden_size,), (c.vocab_size,), ("embed", "vocab"), c, island=True, out_dtype="float32")
        self.mtp = [MTPModule(c, name=f"mtp_{k}") for k in range(c.mtp.num_nextn_predict_layers)]

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, cache: Optional[ModelCache] = None,
                 view: Optional[CacheView] = None, return_mtp: bool = False, mtp_depth: Optional[int] = None,
                 replay: Optional[ReplayIds] = None, full_output: bool = False):
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        x_BTD = self.embed(tokens_BT)
        new_dense = new_moe = moe_stats = None
        if self.dense_stack is not None:
            x_BTD, new_dense, _ = self.dense_stack(x_BTD, positions_BT, segment_ids_BT, view,
                                                   cache.dense if cache else None, None)
        if self.moe_stack is not None:
            x_BTD, new_moe, moe_stats = self.moe_stack(x_BTD, positions_BT, segment_ids_BT, view,
                                                       cache.moe if cache else None, replay.moe if replay else None)
        hidden_BTD = self.final_norm(x_BTD)
        logits_BTV = self.head(hidden_BTD)

        mtp_logits, mtp_stats, mtp_caches = [], [], []
        depth = len(self.mtp) if mtp_depth is None else min(mtp_depth, len(self.mtp))
        if return_mtp or self.is_initializing():
            h_BTD = hidden_BTD
            for k in range(depth if not self.is_initializing() else len(self.mtp)):
                emb_BTD = self.embed(shift_left(tokens_BT, k + 1))
                h_BTD, normed_BTD, layer_cache, stats = self.mtp[k](
                    h_BTD, emb_BTD, positions_BT, segment_ids_BT, view,
                    cache.mtp[k] if cache else None, replay.mtp[k] if replay else None)
                mtp_logits.append(self.head(normed_BTD))
                mtp_stats.append(stats)
                mtp_caches.append(layer_cache)
        if not full_output:
            return logits_BTV
        new_cache = None
        if cache is not None:
            w = view.write_index
            mtp = tuple(write_entries(old, new, w) for old, new in zip(cache.mtp, mtp_caches))
            new_cache = ModelCache(write_entries(cache.dense, new_dense, w), write_entries(cache.moe, new_moe, w),
                                   mtp + tuple(cache.mtp[len(mtp_caches):]))
        return ModelOutput(logits_BTV, tuple(mtp_logits), moe_stats, tuple(mtp_stats), hidden_BTD, new_cache)

    def mtp_step(self, depth: int, h_prev_BTD, tokens_BT, positions_BT, segment_ids_BT, *, cache: LayerCache,
                 view: CacheView):
        """MTP module `depth` (0-based) alone, with its latent cache: speculative drafting.

        `h_prev_BTD` is h^{depth} of the module docstring (the main model's post-norm hidden for
        depth 0, else the previous module's output) at positions_BT; `tokens_BT` holds the token
        at position + depth + 1 for each column. Returns (h_BTD, logits_BTV float32, new cache).
        Call through `apply(variables, depth, ..., method=Transformer.mtp_step)`.
        """
        emb_BTD = self.embed(tokens_BT)
        h_BTD, normed_BTD, entries, _ = self.mtp[depth](h_prev_BTD, emb_BTD, positions_BT, segment_ids_BT, view,
                                                        cache, None)
        return h_BTD, self.head(normed_BTD), write_entries(cache, entries, view.write_index)

"""One pre-norm decoder layer (MLA, then a dense SwiGLU or a DeepSeekMoE FFN) and the scanned
stacks of them.

Layers are stacked with nn.scan (the first_k_dense_replace dense layers and the MoE layers as two
separate scans), so compile time stays flat in depth; each layer is rematerialized under the
configured policy: "dots" and "minimal" save matmul outputs (all, or those without batch
dimensions) and also the outputs of the GEMMs no dot policy recognizes — the routed experts'
grouped-GEMM kernels and FP8 GEMMs, and the FP8 GEMMs' quantized operands (names in
`dsjax.remat_names`) — and of cuDNN attention, which the backward pass would otherwise re-run. On
one H200 (configs/small.py) this took the attention forward from 20 to 4 ms per step and the
expert GEMMs from 12 to 9 kernels per MoE layer (BENCHMARKS.md). Per-layer outputs (new cache slices, MoE statistics) come back stacked [L, ...].
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import linen as nn

from dsjax.config import ModelConfig
from dsjax.model.fp8_weights import FP8_COLLECTION
from dsjax.model.layers import RMSNorm, SwiGLU
from dsjax.model.mla import MLA, CacheView, LayerCache
from dsjax.model.moe import MoE
from dsjax.remat_names import EXCHANGED, FP8_OPERANDS, SAVED_GEMM

_SAVE_NAMED = jax.checkpoint_policies.save_only_these_names(SAVED_GEMM, FP8_OPERANDS, EXCHANGED)


def _save_kernels(prim, *args, **params) -> bool:
    """The custom kernels' forward outputs: values named in dsjax.remat_names (expert grouped GEMMs,
    FP8 GEMMs and their quantized operands, expert-parallel received rows) and cuDNN flash attention (its output and softmax statistics, the residuals its backward needs;
    a few MB per layer against re-running the attention forward)."""
    return prim.name.startswith("dot_product_attention_fwd") or _SAVE_NAMED(prim, *args, **params)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _save_kernels),
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _save_kernels),
}


class DecoderLayer(nn.Module):
    config: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, view: Optional[CacheView],
                 cache: Optional[LayerCache], replay_ids_BTK):
        c = self.config
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
        h_BTD = RMSNorm(c.hidden_size, c, name="attn_norm")(x_BTD)
        attn_BTD, new_cache = MLA(c, name="attn")(h_BTD, positions_BT, segment_ids_BT, cache, view)
        x_BTD = x_BTD + attn_BTD
        h_BTD = RMSNorm(c.hidden_size, c, name="mlp_norm")(x_BTD)
        if self.moe:
            ffn_BTD, stats = MoE(c, name="moe")(h_BTD, segment_ids_BT, replay_ids_BTK)
        else:
            ffn_BTD, stats = SwiGLU(c.intermediate_size, c, name="mlp")(h_BTD), None
        x_BTD = nn.with_logical_constraint(x_BTD + ffn_BTD, ("batch", "length", "embed"))
        return x_BTD, new_cache, stats


class _ScanBody(nn.Module):
    """Adapts DecoderLayer to nn.scan's (carry, xs) -> (carry, ys) form."""

    config: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x_BTD, xs, positions_BT, segment_ids_BT, view):
        cache, replay_ids_BTK = xs
        layer = DecoderLayer
        if self.config.remat != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
        x_BTD, new_cache, stats = layer(self.config, self.moe, name="layer")(
            x_BTD, positions_BT, segment_ids_BT, view, cache, replay_ids_BTK)
        return x_BTD, (new_cache, stats)


class LayerStack(nn.Module):
    """`num_layers` decoder layers under one nn.scan; params carry a leading 'layers' axis."""

    config: ModelConfig
    moe: bool
    num_layers: int

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, view=None, cache=None, replay_ids_LBTK=None):
        scan = nn.scan(
            _ScanBody,
            variable_axes={"params": 0, "router": 0, FP8_COLLECTION: 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BTD, (new_cache, stats) = scan(self.config, self.moe, name="scan")(
            x_BTD, (cache, replay_ids_LBTK), positions_BT, segment_ids_BT, view)
        return x_BTD, new_cache, stats

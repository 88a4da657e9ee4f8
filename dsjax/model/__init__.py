"""The DeepSeek-V3 model in Flax Linen."""

from dsjax.model.mla import CacheView, LayerCache
from dsjax.model.transformer import ModelCache, ModelOutput, ReplayIds, Transformer, compute_variables

__all__ = ["Transformer", "ModelOutput", "ModelCache", "ReplayIds", "LayerCache", "CacheView", "compute_variables"]

"""AdamW with warmup + cosine decay, global-norm clipping, and no decay on norms.

DeepSeek-V3 §4.2 trains with AdamW (β1 0.9, β2 0.95, weight decay 0.1), gradient clipping 1.0 and
a warmup-then-decay schedule. dsjax keeps fp32 master weights (param_dtype) and optionally stores
the first moment in bf16 (`train.bf16_moments`; optax's adam has no second-moment dtype — V3 keeps
both moments in bf16, dsjax only the first: a deviation). Weight decay skips norm scales (the only
non-matrix parameters; the router bias is not a parameter at all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsjax.config import TrainConfig


def schedule(t: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * t.min_lr_ratio)


def decay_mask(params):
    """True for weights that decay: everything but norm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(t: TrainConfig, learning_rate=None) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(learning_rate if learning_rate is not None else schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                    weight_decay=t.weight_decay, mask=decay_mask,
                    mu_dtype=jnp.bfloat16 if t.bf16_moments else None),
    )

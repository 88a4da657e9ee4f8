"""The V3 pre-training objective (DeepSeek-V3 §2.1.2, §2.2):

    L = CE(next token) + mtp_weight · mean_k CE_k(token i+k+1) + seq_aux_weight · sum_layers L_bal

CE is averaged over real targets (batch['loss_mask']); `normalizer` lets gradient accumulation
divide every microbatch by the token count of the whole batch. MTP depth k at position i predicts
t_{i+k+1} and counts only where t_i .. t_{i+k+1} lie in one packed document (the loss mask of
positions i .. i+k all set). L_bal is the sequence-wise balance loss of each MoE layer (MTP
layers included), summed over layers as the paper adds one per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import Config
from dsjax.model import ModelOutput
from dsjax.model.transformer import shift_left


class LossParts(NamedTuple):
    total: jax.Array
    ce_sum: jax.Array  # summed next-token CE over real targets
    tokens: jax.Array  # real targets
    mtp_ce: jax.Array  # mean over depths of the per-token MTP CE (0 without MTP)
    balance: jax.Array  # sum over MoE layers of L_bal


def token_ce(logits_BTV, targets_BT):
    """Per-token cross-entropy in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return lse_BT - picked_BT


def mtp_targets(targets_BT, mask_BT, k: int):
    """Targets and mask of MTP depth k (1-based): t_{i+k+1} where the chain stays in one document."""
    mask_k_BT = mask_BT
    for j in range(1, k + 1):
        mask_k_BT = mask_k_BT * shift_left(mask_BT, j)
    return shift_left(targets_BT, k), mask_k_BT


def loss_parts(out: ModelOutput, batch, config: Config, normalizer) -> LossParts:
    t = config.train
    targets_BT, mask_BT = batch["targets"], batch["loss_mask"].astype(jnp.float32)
    ce_sum = (token_ce(out.logits, targets_BT) * mask_BT).sum()
    total = ce_sum / normalizer
    mtp_ce = jnp.zeros((), jnp.float32)
    if out.mtp_logits:
        per_depth = []
        for k, logits_BTV in enumerate(out.mtp_logits, start=1):
            tgt_BT, m_BT = mtp_targets(targets_BT, mask_BT, k)
            per_depth.append((token_ce(logits_BTV, tgt_BT) * m_BT).sum() / jnp.maximum(m_BT.sum(), 1.0))
        mtp_ce = jnp.mean(jnp.stack(per_depth))
        # scaled so that summing microbatches gives the full-batch mean
        total = total + t.mtp_weight * mtp_ce * (mask_BT.sum() / normalizer)
    balance = jnp.zeros((), jnp.float32)
    if out.moe_stats is not None:
        balance = balance + out.moe_stats.balance_loss.sum()
    for stats in out.mtp_stats:
        if stats is not None:
            balance = balance + stats.balance_loss
    total = total + t.seq_aux_weight * balance * (mask_BT.sum() / normalizer)
    return LossParts(total, ce_sum, mask_BT.sum(), mtp_ce, balance)

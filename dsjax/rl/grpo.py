"""GRPO: group-relative advantages and the clipped policy loss.

GRPO (DeepSeekMath §4.1, used for DeepSeek-R1-Zero and R1) samples a group of G completions per
prompt, scores them, and replaces PPO's value baseline with group statistics. dsjax's objective:

1. Advantages (`group_advantages`, rewards [P, G]): A = (r - mean_g) / (std + 1e-4), with std the
   sample standard deviation (ddof=1, as TRL and Tunix) of each group ("group"), of the whole
   batch ("batch", TRL's scale_rewards="batch"), or no division ("none", Dr. GRPO). A group whose
   rewards are all equal gets exactly 0 (no float residue from a non-dyadic mean). G >= 2.
2. Ratio per token: exp(logp - old_logp); surrogate min(ratio·A, clip(ratio, 1-ε_low, 1+ε_high)·A)
   (ε_high > ε_low is DAPO's clip-higher).
3. KL to the reference policy with the k3 estimator exp(ref - logp) - (ref - logp) - 1
   (DeepSeekMath eq. 4), weighted by β; β = 0 (TRL's default) needs no reference model.
4. Per-token loss -(surrogate - β·KL), aggregated as TRL's loss_type:
   "sequence" (TRL "grpo", the paper's 1/G Σ 1/|o_i| Σ_t): mean over each completion's tokens,
   then mean over completions (an empty completion contributes 0 but still counts);
   "token" (TRL "bnpo"/DAPO token-mean): sum / num_tokens, where num_tokens defaults to
   mask.sum() and should be the token count of the whole update batch across microbatches;
   "dr_grpo" (Dr. GRPO, arXiv 2503.20783): sum / (B·T), T the fixed max completion length.

Deviations from the papers: old_logp and ref_logp are stop-gradiented here (so passing
old_logp = logp gives the on-policy gradient), and padded positions are masked before exp, so
garbage or -inf log-probs under the mask cannot produce inf or NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGE_EPS = 1e-4  # TRL's ε in (r - mean) / (std + ε)
SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sequence", "token", "dr_grpo")


def group_advantages(rewards_PG: jax.Array, scale: str = "group") -> jax.Array:
    """Group-relative advantages [P, G] from rewards [P, G] (P prompts, G completions each)."""
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    rewards_PG = jnp.asarray(rewards_PG)
    if rewards_PG.ndim != 2:
        raise ValueError(f"group_advantages: rewards must be [P, G], got shape {rewards_PG.shape}")
    if rewards_PG.shape[1] < 2:
        raise ValueError(f"group_advantages: group size G must be >= 2 (got G={rewards_PG.shape[1]}, "
                         f"rewards shape {rewards_PG.shape}); one sample per prompt has no group baseline")
    rewards_PG = rewards_PG.astype(jnp.result_type(rewards_PG.dtype, jnp.float32))
    equal_P1 = rewards_PG.max(axis=1, keepdims=True) == rewards_PG.min(axis=1, keepdims=True)
    centered_PG = jnp.where(equal_P1, 0.0, rewards_PG - rewards_PG.mean(axis=1, keepdims=True))
    if scale == "none":
        return centered_PG
    axis = 1 if scale == "group" else None
    std = jnp.std(rewards_PG, axis=axis, ddof=1, keepdims=True)
    return centered_PG / (std + ADVANTAGE_EPS)


def grpo_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, *, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, beta: float = 0.0, aggregation: str = "token",
              num_tokens=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss (module docstring) and metrics {clip_fraction, kl, ratio_mean} as scalars.

    logp/old_logp/ref_logp/mask are [B, T] over completion tokens, advantages [B]; ref_logp may be
    None when beta == 0. beta, epsilons and aggregation are Python values; num_tokens may be traced.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo_loss: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if beta != 0 and ref_logp_BT is None:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logp (got None); pass ref_logp or set beta=0")
    compute_dtype = jnp.promote_types(jnp.asarray(logp_BT).dtype, jnp.float32)  # losses in fp32
    logp_BT, old_logp_BT, adv_B = (jnp.asarray(x, compute_dtype) for x in (logp_BT, old_logp_BT, adv_B))
    ref_logp_BT = None if ref_logp_BT is None else jnp.asarray(ref_logp_BT, compute_dtype)
    mask_BT = jnp.asarray(mask_BT)
    if logp_BT.ndim != 2 or old_logp_BT.shape != logp_BT.shape or mask_BT.shape != logp_BT.shape:
        raise ValueError(f"grpo_loss: logp, old_logp and mask must share one [B, T] shape, got "
                         f"{logp_BT.shape}, {old_logp_BT.shape}, {mask_BT.shape}")
    if adv_B.shape != logp_BT.shape[:1]:
        raise ValueError(f"grpo_loss: advantages must be [B]={logp_BT.shape[:1]}, got {adv_B.shape}")
    valid_BT = mask_BT.astype(bool)
    mask_BT = valid_BT.astype(logp_BT.dtype)
    zero = jnp.zeros((), logp_BT.dtype)

    log_ratio_BT = jnp.where(valid_BT, logp_BT - jax.lax.stop_gradient(old_logp_BT), zero)
    ratio_BT = jnp.exp(log_ratio_BT)
    adv_B1 = jax.lax.stop_gradient(adv_B)[:, None]
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = jnp.clip(ratio_BT, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv_B1
    per_token_BT = -jnp.minimum(unclipped_BT, clipped_BT)

    kl_BT = None
    if beta != 0:
        delta_BT = jnp.where(valid_BT, jax.lax.stop_gradient(ref_logp_BT) - logp_BT, zero)
        kl_BT = jnp.exp(delta_BT) - delta_BT - 1.0
        per_token_BT = per_token_BT + beta * kl_BT
    per_token_BT = jnp.where(valid_BT, per_token_BT, zero)

    batch, length = logp_BT.shape
    n_valid = mask_BT.sum()
    if aggregation == "sequence":
        per_seq_B = per_token_BT.sum(axis=1) / jnp.maximum(mask_BT.sum(axis=1), 1.0)
        loss = per_seq_B.mean()
    elif aggregation == "token":
        denom = n_valid if num_tokens is None else jnp.asarray(num_tokens, logp_BT.dtype)
        loss = per_token_BT.sum() / jnp.maximum(denom, 1.0)
    else:
        loss = per_token_BT.sum() / (batch * length)

    def masked_mean(x_BT):
        return jax.lax.stop_gradient(jnp.where(valid_BT, x_BT, zero).sum() / jnp.maximum(n_valid, 1.0))

    clipped_active_BT = (((ratio_BT < 1.0 - epsilon_low) & (adv_B1 < 0))
                         | ((ratio_BT > 1.0 + epsilon_high) & (adv_B1 > 0)))
    metrics = {
        "clip_fraction": masked_mean(clipped_active_BT.astype(logp_BT.dtype)),
        "kl": zero if kl_BT is None else masked_mean(kl_BT),
        "ratio_mean": masked_mean(ratio_BT),
    }
    return loss, metrics


def reward_metrics(rewards_PG, completion_lengths) -> dict[str, jax.Array]:
    """Rollout statistics: reward mean/std, completion length mean/max, and frac_reward_zero_std,
    the fraction of groups whose rewards are all equal (zero advantage, so no learning signal)."""
    rewards_PG = jnp.asarray(rewards_PG, jnp.float32)
    lengths = jnp.asarray(completion_lengths, jnp.float32)
    equal_P = rewards_PG.max(axis=1) == rewards_PG.min(axis=1)
    return {
        "reward_mean": rewards_PG.mean(),
        "reward_std": rewards_PG.std(),
        "completion_length_mean": lengths.mean(),
        "completion_length_max": lengths.max(),
        "frac_reward_zero_std": equal_P.astype(jnp.float32).mean(),
    }

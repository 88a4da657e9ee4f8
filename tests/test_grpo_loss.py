"""grpo_loss and group_advantages vs straightforward numpy (float64), and grad vs finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.rl import grpo

RTOL, ATOL = 1e-5, 1e-6  # float32 jax vs float64 numpy
FD_STEP = 1e-6  # central differences in float64
FD_RTOL, FD_ATOL = 1e-6, 1e-9
B, T = 5, 7


def numpy_grpo_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation, num_tokens=None):
    logp, old, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, adv, mask))
    losses, clipped, kls, ratios = np.zeros_like(logp), [], [], []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = np.exp(logp[b, t] - old[b, t])
            clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
            surrogate = min(ratio * adv[b], clipped_ratio * adv[b])
            kl = 0.0
            if beta != 0:
                d = ref[b, t] - logp[b, t]
                kl = np.exp(d) - d - 1
            losses[b, t] = -(surrogate - beta * kl)
            clipped.append(clipped_ratio * adv[b] < ratio * adv[b])
            kls.append(kl)
            ratios.append(ratio)
    if aggregation == "sequence":
        loss = np.mean([losses[b].sum() / max(mask[b].sum(), 1) for b in range(logp.shape[0])])
    elif aggregation == "token":
        loss = losses.sum() / (mask.sum() if num_tokens is None else num_tokens)
    else:
        loss = losses.sum() / logp.size
    return loss, {"clip_fraction": np.mean(clipped), "kl": np.mean(kls), "ratio_mean": np.mean(ratios)}


def make_inputs(seed):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, (B, T))
    old = logp + rng.normal(0.0, 0.1, (B, T))
    for b in (0, 1):  # rows whose ratios fall outside 1±0.2 on both sides, with A > 0 and A < 0
        old[b] = logp[b] - rng.choice([-1.0, 1.0], T) * rng.uniform(0.4, 0.8, T)
    ref = logp + rng.normal(0.0, 0.3, (B, T))
    adv = rng.normal(0.0, 1.0, B)
    adv[:2] = 1.5, -0.7
    lengths = np.array([T, T - 2, 3, 1, 0])  # padding, and a zero-length completion
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    logp[~mask.astype(bool)] = -np.inf  # padded garbage must not leak into loss or grads
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_numpy(aggregation, beta, seed):
    logp, old, ref, adv, mask = make_inputs(seed)
    eps_low, eps_high = 0.2, 0.28
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, metrics = grpo.grpo_loss(f32(logp), f32(old), f32(ref) if beta else None, f32(adv), f32(mask),
                                   epsilon_low=eps_low, epsilon_high=eps_high, beta=beta,
                                   aggregation=aggregation)
    want_loss, want_metrics = numpy_grpo_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=RTOL, atol=ATOL, err_msg=key)
    assert want_metrics["clip_fraction"] > 0  # the out-of-range row exercises the clipped branch


def test_token_aggregation_uses_num_tokens():
    logp, old, ref, adv, mask = make_inputs(2)
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, aggregation="token", num_tokens=100)
    want, _ = numpy_grpo_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.0, "token", num_tokens=100)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grad_matches_finite_differences(aggregation, beta):
    logp, old, ref, adv, mask = make_inputs(3)
    logp = np.where(mask > 0, logp, -5.0)
    # keep every ratio at least 1e-3 away from the clip boundaries, where the loss has kinks
    for bound in (np.log(0.8), np.log(1.2)):
        near = np.abs(logp - old - bound) < 1e-3
        old = np.where(near, old - 1e-2, old)
    with jax.enable_x64(True):
        def loss_fn(x):
            return grpo.grpo_loss(x, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                                  beta=beta, aggregation=aggregation)[0]
        x = jnp.asarray(logp, jnp.float64)
        grad = np.asarray(jax.grad(loss_fn)(x))
        assert grad.dtype == np.float64
        fd = np.zeros_like(logp)
        for idx in np.ndindex(*logp.shape):
            e = np.zeros_like(logp)
            e[idx] = FD_STEP
            fd[idx] = (loss_fn(x + e) - loss_fn(x - e)) / (2 * FD_STEP)
    np.testing.assert_allclose(grad, fd, rtol=FD_RTOL, atol=FD_ATOL)
    assert np.all(grad[mask == 0] == 0.0)
    assert np.any(grad != 0.0)


def test_on_policy_gradient_is_minus_advantage():
    """old_logp = logp (one update per rollout): d loss / d logp = -A / num_tokens under the mask."""
    logp, _, _, adv, mask = make_inputs(4)
    logp = jnp.asarray(np.where(mask > 0, logp, 0.0), jnp.float32)
    grad = jax.grad(lambda x: grpo.grpo_loss(x, x, None, adv, mask, aggregation="token")[0])(logp)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=RTOL, atol=ATOL)


def test_all_masked_loss_is_zero_and_finite():
    logp, old, ref, adv, _ = make_inputs(5)
    mask = np.zeros((B, T), np.float32)
    for aggregation in grpo.AGGREGATIONS:
        loss, metrics = grpo.grpo_loss(logp, old, ref, adv, mask, beta=0.1, aggregation=aggregation)
        assert float(loss) == 0.0, aggregation
        assert all(np.isfinite(v) for v in metrics.values()), aggregation


def test_loss_argument_errors():
    logp, old, ref, adv, mask = make_inputs(6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo.grpo_loss(logp, old, ref, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match=r"\[B\]"):
        grpo.grpo_loss(logp, old, ref, adv[:-1], mask)


def numpy_advantages(rewards, scale):
    rewards = np.asarray(rewards, np.float64)
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    if scale == "none":
        return centered
    std = rewards.std(axis=1, ddof=1, keepdims=True) if scale == "group" else rewards.std(ddof=1)
    return centered / (std + 1e-4)


@pytest.mark.parametrize("scale", grpo.SCALES)
@pytest.mark.parametrize("group_size", [2, 8, 16])
def test_advantages_match_numpy(scale, group_size):
    rewards = np.random.default_rng(group_size).normal(size=(4, group_size)).astype(np.float32)
    adv = grpo.group_advantages(rewards, scale=scale)
    assert adv.shape == rewards.shape
    np.testing.assert_allclose(adv, numpy_advantages(rewards, scale), rtol=RTOL, atol=1e-5)
    assert np.abs(np.asarray(adv)).max() <= np.sqrt(group_size) or scale != "group"


@pytest.mark.parametrize("scale", grpo.SCALES)
def test_equal_rewards_give_zero_advantage(scale):
    rewards = np.array([[0.35] * 8, [1.0] * 8, [0.0] * 8, [1, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    adv = np.asarray(grpo.group_advantages(rewards, scale=scale))
    assert np.all(np.isfinite(adv))
    assert np.all(adv[:3] == 0.0)
    assert np.all(adv[3] != 0.0)


def test_advantage_argument_errors():
    with pytest.raises(ValueError, match="G=1"):
        grpo.group_advantages(np.ones((4, 1)))
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(np.ones((4, 2)), scale="std")
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        grpo.group_advantages(np.ones(4))


def test_reward_metrics():
    rewards = np.array([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    m = grpo.reward_metrics(rewards, np.array([3, 5, 7, 9, 1, 1, 1, 1, 2, 2, 2, 2]))
    np.testing.assert_allclose(m["reward_mean"], rewards.mean())
    np.testing.assert_allclose(m["reward_std"], rewards.std())
    np.testing.assert_allclose(m["completion_length_mean"], 3.0)
    np.testing.assert_allclose(m["completion_length_max"], 9.0)
    np.testing.assert_allclose(m["frac_reward_zero_std"], 2 / 3)

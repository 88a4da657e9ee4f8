"""One training step: step(state, batch) -> (state, metrics), pure and jitted with explicit
shardings and the state donated.

Gradient accumulation scans over `train.microbatches` slices of the batch, every slice's loss
divided by the whole batch's token count so the summed gradient is the full-batch mean. A
non-finite loss or gradient norm skips the update: params, optimizer state and router bias stay
bit-identical, while the step counter (and, in the loop, the data iterator) advance and the skip
is counted. Otherwise the optimizer applies the update and the router bias takes its
aux-loss-free balancing step (`balance.update_router`) from the step's loads.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from dsjax import sharding as shd
from dsjax import xla_options
from dsjax.config import Config
from dsjax.model import Transformer, compute_variables
from dsjax.train import balance
from dsjax.train.loss import LossParts, loss_parts
from dsjax.train.optimizer import schedule
from dsjax.train.state import TrainState

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class LossAndGrads(NamedTuple):
    parts: LossParts  # summed over microbatches
    moe_load: jax.Array  # [L_moe, E] tokens per expert (empty without MoE layers)
    mtp_load: tuple  # per MTP module, [E]
    dropped: jax.Array  # int32 (token, expert) pairs dropped
    grads: object  # like params


def loss_and_grads(config: Config, params, router, batch) -> LossAndGrads:
    """Summed loss parts, loads, (token, expert) pairs dropped by the MoE layers (capacity
    dispatch, or expert parallelism's `ep_pair_capacity`; 0 when dropless) and gradients over the
    batch's microbatches."""
    model = Transformer(config.model)
    use_mtp = config.model.mtp.num_nextn_predict_layers > 0 and config.train.mtp_weight > 0
    normalizer = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)

    def loss_fn(p, mb):
        with nn.logical_axis_rules(shd.ACTIVATION_RULES):
            out = model.apply(compute_variables(config.model, {"params": p, **router}), mb["tokens"], mb["positions"], mb["segment_ids"],
                              return_mtp=use_mtp, full_output=True)
        parts = loss_parts(out, mb, config, normalizer)
        moe_load = out.moe_stats.load_E if out.moe_stats is not None else jnp.zeros((0,), jnp.float32)
        mtp_load = tuple(s.load_E for s in out.mtp_stats if s is not None)
        dropped = sum((s.dropped.sum() for s in (out.moe_stats, *out.mtp_stats) if s is not None),
                      jnp.zeros((), jnp.int32))
        return parts.total, (parts, moe_load, mtp_load, dropped)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    m = config.train.microbatches
    if m == 1:
        (_, (parts, moe_load, mtp_load, dropped)), grads = grad_fn(params, batch)
        return LossAndGrads(parts, moe_load, mtp_load, dropped, grads)
    micro = jax.tree_util.tree_map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)
    (_, (parts, moe_load, mtp_load, dropped)), grads = sum_over_chunks(lambda mb: grad_fn(params, mb), micro)
    parts = parts._replace(mtp_ce=parts.mtp_ce / m, balance=parts.balance / m)
    return LossAndGrads(parts, moe_load, mtp_load, dropped, grads)


def sum_over_chunks(fn, chunks):
    """Σ_i fn(chunk_i) over the leading axis of every leaf of `chunks` (None leaves stay None), as a
    scan, so one chunk's activations are live at a time: gradient accumulation over microbatches."""
    first = fn(jax.tree_util.tree_map(lambda x: x[0], chunks))
    rest = jax.tree_util.tree_map(lambda x: x[1:], chunks)
    total, _ = jax.lax.scan(lambda acc, c: (jax.tree_util.tree_map(jnp.add, acc, fn(c)), None), first, rest)
    return total


def apply_if_finite(optimizer: optax.GradientTransformation, state: TrainState, grads, loss, *, router=None,
                    rng=None) -> tuple[TrainState, jax.Array]:
    """The optimizer step (and, when given, the new router bias and rng) unless the loss or the
    gradient norm is non-finite; then params, optimizer state and router stay bit-identical. The
    step counter advances and skips are counted either way. Returns (state, gradient norm)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep(new, old):
        return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

    return state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        router=state.router if router is None else keep(router, state.router),
        rng=state.rng if rng is None else rng,
        skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1).astype(jnp.int32),
    ), grad_norm


def train_step(config: Config, optimizer: optax.GradientTransformation, state: TrainState, batch):
    parts, moe_load, mtp_load, dropped, grads = loss_and_grads(config, state.params, state.router, batch)
    new_router = balance.update_router(state.router, moe_load, mtp_load, config.train.bias_update_rate)
    new_state, grad_norm = apply_if_finite(optimizer, state, grads, parts.total, router=new_router,
                                           rng=jax.random.fold_in(state.rng, state.step))
    metrics = {
        "loss": parts.ce_sum / jnp.maximum(parts.tokens, 1.0),
        "total_loss": parts.total,
        "mtp_loss": parts.mtp_ce,
        "balance_loss": parts.balance,
        "grad_norm": grad_norm,
        "learning_rate": schedule(config.train)(state.step),
        "skipped_steps": new_state.skipped,
        "consecutive_skips": new_state.consecutive_skips,
        "tokens": parts.tokens,
    }
    if moe_load.size:
        metrics["expert_load_max_over_mean"] = balance.load_ratio(moe_load)
        metrics["dropped_pairs"] = dropped
    return new_state, metrics


def make_train_step(config: Config, optimizer, mesh, state_shardings) -> Callable:
    """The jitted step: state sharded as created, batch over ('data', 'expert'), state donated,
    compiled with `xla_options.TRAINING`."""
    batch_shardings = {k: shd.batch_sharding(mesh, 2) for k in BATCH_KEYS}
    return jax.jit(lambda s, b: train_step(config, optimizer, s, b),
                   in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0,
                   compiler_options=xla_options.TRAINING)

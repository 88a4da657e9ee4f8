"""The GRPO loop: rollouts and updates on one sharded model, with resume, metrics and plots.

DeepSeek-R1 §2.2 trains with GRPO (DeepSeekMath §4.1): per step, sample a group of G completions
for each prompt, score them with rule-based rewards, and push up the log-probs of the completions
that beat their group's mean. `train_grpo(config, workdir)` runs, per step `s`:

1. prompts: training problems (s-1)·P .. s·P-1 of the arithmetic task (deterministic from the step);
2. generation: G completions each with the inference engine, on the *current* sharded parameters
   (the arrays the update writes: no copy, no second model), sampled with rng fold_in(state.rng, s);
   with `grpo.router_replay` the engine also records every position's routed experts;
3. scoring: `rewards.RewardRunner` over `grpo.reward_funcs`, total reward = Σ weight·reward, group
   advantages (`grpo.group_advantages`, `grpo.scale_rewards`);
4. reference: the sampling policy's log-probs (`old`) only when μ = `num_iterations` > 1 — with
   μ = 1 old = current detached, as TRL does, which gives the same gradient — and the frozen
   reference's (a copy of the initial parameters) only when β > 0; with router replay these
   forwards replay the rollout's experts too, so policy, old and reference log-probs differ by
   weights only (and share one compiled forward);
5. update: μ AdamW steps on `grpo.grpo_loss` over the whole rollout batch (gradient accumulated over
   `grpo.microbatches` row chunks), with the rollout's experts replayed in the forward, plus
   `grpo.mtp_weight` × the MTP head's next-token CE on the completions (keeps the head, and so
   speculative decoding, matched to the policy).

Choices. The router bias (aux-loss-free balancing) stays frozen during RL: the RL batch is one
narrow task, so balancing on its loads would drift the pretrained routing of every other input,
and a bias moving between rollout and update would defeat router replay. No balance loss either.
The learning rate is constant (`grpo.learning_rate`, TRL-style AdamW with `grpo.weight_decay`,
the other AdamW fields and clipping from `train.*`). A non-finite loss or gradient skips the update
(params and moments unchanged), as pretraining does.

Files (DESIGN.md "Files a run writes"): config.json (resolved: the model is the init checkpoint's),
checkpoints/ (TrainState + the GRPO step; the rollout rng is state.rng folded with the step, so a
resumed run repeats the uninterrupted one), metrics.jsonl (one row per logged step; held-out rows
carry `heldout_accuracy`, greedy over `grpo.heldout_eval_size` fixed held-out problems, evaluated
at step 0, every `eval_every` steps and at the end), grpo.png and grpo_stats.png.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dsjax import checkpoint as ckpt_lib
from dsjax import sharding as shd
from dsjax import xla_options
from dsjax.config import Config, ConfigError, model_from_dict, replace, validate
from dsjax.data import heldout_problems, make_tokenizer
from dsjax.model import ReplayIds
from dsjax.model.transformer import shift_left
from dsjax.plotting import plot_metrics
from dsjax.rl import grpo, rewards
from dsjax.rl.logprobs import completion_logprobs, gather_logprobs, policy_forward, split_replay, split_rows
from dsjax.rl.rollout import build_update_batch, decode_completions, encode_prompts, step_problems
from dsjax.train import state as state_lib
from dsjax.train.loss import mtp_targets, token_ce
from dsjax.train.loop import start_workdir, to_python
from dsjax.train.step import apply_if_finite, sum_over_chunks
from dsjax.train.optimizer import make_optimizer
from dsjax.train.state import TrainState

PLOT_KEYS = ("reward_mean", "accuracy", "heldout_accuracy")
STATS_KEYS = ("loss", "entropy", "kl", "clip_fraction", "completion_length_mean", "frac_reward_zero_std")
ROW_KEYS = ("tokens", "positions", "segment_ids", "completion_mask")


# ------------------------------------------------------------------------------ setup


def init_workdir(path: str) -> str:
    """The run directory of grpo.init_checkpoint (its checkpoints/ folder is accepted too)."""
    path = os.path.abspath(path)
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.basename(path) == "checkpoints":
        path = os.path.dirname(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"config field 'grpo.init_checkpoint': {path} has no config.json — expected a "
                          f"run directory written by scripts/train.py")
    return path


def resolve_config(config: Config, num_devices: int) -> Config:
    """The config with the init checkpoint's model, validated, with the GRPO shape checks."""
    g = config.grpo
    if g.init_checkpoint:
        with open(os.path.join(init_workdir(g.init_checkpoint), "config.json")) as f:
            config = replace(config, model=model_from_dict(json.load(f)["model"]))
    config = validate(config, num_devices)
    if g.max_prompt_length + g.max_completion_length > config.model.max_position_embeddings:
        raise ConfigError(f"config field 'grpo.max_completion_length': max_prompt_length + max_completion_length"
                          f" = {g.max_prompt_length + g.max_completion_length} exceeds model."
                          f"max_position_embeddings={config.model.max_position_embeddings}")
    if config.model.eos_token_id is None:
        raise ConfigError("config field 'model.eos_token_id': GRPO generation needs an EOS id")
    return config


def check_mesh(config: Config, mesh) -> None:
    g = config.grpo
    shards = shd.num_batch_shards(mesh)
    rows = g.prompts_per_step * g.num_generations
    if rows % (shards * g.microbatches):
        raise ConfigError(f"config field 'grpo.prompts_per_step': prompts_per_step*num_generations={rows} does "
                          f"not divide over data*expert={shards} devices x grpo.microbatches={g.microbatches}")
    if g.heldout_eval_size and g.eval_batch_size % shards:
        raise ConfigError(f"config field 'grpo.eval_batch_size': {g.eval_batch_size} does not divide over "
                          f"data*expert={shards} devices")


def make_grpo_optimizer(config: Config) -> optax.GradientTransformation:
    """AdamW at the constant grpo.learning_rate with grpo.weight_decay; the rest from train.*."""
    return make_optimizer(replace(config.train, weight_decay=config.grpo.weight_decay),
                          learning_rate=config.grpo.learning_rate)


def initial_params(config: Config, mesh):
    """(params, router) to start from: the init checkpoint's, else a fresh init from grpo.seed."""
    if config.grpo.init_checkpoint:
        _, variables, _ = state_lib.load_workdir(init_workdir(config.grpo.init_checkpoint), mesh=mesh)
        return variables["params"], {"router": variables["router"]} if "router" in variables else {}
    fresh = state_lib.create(config, make_grpo_optimizer(config), mesh, config.grpo.seed)
    return fresh.params, fresh.router


def initial_state(config: Config, optimizer, mesh) -> TrainState:
    """A TrainState at step 0 on `mesh`: the initial params, fresh optimizer moments, rng from grpo.seed."""
    if not config.grpo.init_checkpoint:  # a random policy (tests): the pretraining init, from grpo.seed
        return state_lib.create(config, optimizer, mesh, config.grpo.seed)
    shardings = state_lib.shardings(config, optimizer, mesh)
    params, router = initial_params(config, mesh)
    build = jax.jit(lambda p, r: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), r,
                                            jax.random.PRNGKey(config.grpo.seed), jnp.zeros((), jnp.int32),
                                            jnp.zeros((), jnp.int32)), out_shardings=shardings)
    with jax.set_mesh(mesh):
        return build(params, router)


# ------------------------------------------------------------------------------ update


def _mtp_ce(config: Config, out, rows, num_tokens):
    """Mean over MTP depths of the summed CE on completion targets, over the batch's completion tokens."""
    mask_BC = rows["completion_mask"]
    b, lc = mask_BC.shape
    lp = rows["tokens"].shape[1] - lc
    targets_BL = shift_left(rows["tokens"], 1)
    mask_BL = jnp.concatenate([jnp.zeros((b, lp - 1)), mask_BC, jnp.zeros((b, 1))], axis=1)
    per_depth = []
    for k, logits_BLV in enumerate(out.mtp_logits, start=1):
        tgt_BL, m_BL = mtp_targets(targets_BL, mask_BL, k)
        per_depth.append((token_ce(logits_BLV, tgt_BL) * m_BL).sum() / jnp.maximum(num_tokens, 1.0))
    return jnp.mean(jnp.stack(per_depth))


def grpo_objective(config: Config, params, router, rows, replay, old_logp, ref_logp, adv, num_tokens,
                   microbatches: int):
    """This chunk's share of the GRPO loss (+ MTP term); aux: (policy loss, metric sums)."""
    g = config.grpo
    use_mtp = config.model.mtp.num_nextn_predict_layers > 0 and g.mtp_weight > 0
    out = policy_forward(config.model, {"params": params, **router}, rows, replay, return_mtp=use_mtp)
    mask_BC = rows["completion_mask"]
    logp_BC, entropy_BC = gather_logprobs(out.logits, rows["tokens"], mask_BC.shape[1])
    old_BC = jax.lax.stop_gradient(logp_BC) if old_logp is None else old_logp
    loss, m = grpo.grpo_loss(logp_BC, old_BC, ref_logp, adv, mask_BC, epsilon_low=g.epsilon_low,
                             epsilon_high=g.epsilon_high, beta=g.beta, aggregation=g.aggregation,
                             num_tokens=num_tokens)
    if g.aggregation != "token":  # per-chunk means of equal-size chunks: their average is the batch's
        loss = loss / microbatches
    n_valid = mask_BC.sum()
    sums = {"clip_fraction": m["clip_fraction"] * n_valid, "kl": m["kl"] * n_valid,
            "ratio_mean": m["ratio_mean"] * n_valid, "entropy": (entropy_BC * mask_BC).sum()}
    total = loss
    if use_mtp:
        sums["mtp_loss"] = _mtp_ce(config, out, rows, num_tokens)
        total = total + g.mtp_weight * sums["mtp_loss"]
    return total, (loss, sums)


def update_step(config: Config, optimizer, state: TrainState, rows, replay, old_logp, ref_logp, adv):
    """One optimizer step on the whole rollout batch; returns (state, metrics)."""
    m = config.grpo.microbatches
    num_tokens = rows["completion_mask"].sum()
    grad_fn = jax.value_and_grad(
        lambda p, r, rp, o, rf, a: grpo_objective(config, p, state.router, r, rp, o, rf, a, num_tokens, m),
        has_aux=True)
    if m == 1:
        (_, (loss, sums)), grads = grad_fn(state.params, rows, replay, old_logp, ref_logp, adv)
    else:
        chunk = lambda x: None if x is None else split_rows(x, m)  # noqa: E731
        xs = (jax.tree_util.tree_map(chunk, rows), split_replay(replay, m), chunk(old_logp), chunk(ref_logp),
              chunk(adv))
        (_, (loss, sums)), grads = sum_over_chunks(lambda x: grad_fn(state.params, *x), xs)
    new_state, grad_norm = apply_if_finite(optimizer, state, grads, loss)  # router bias frozen during RL
    denom = jnp.maximum(num_tokens, 1.0)
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped_steps": new_state.skipped,
               **{k: v if k == "mtp_loss" else v / denom for k, v in sums.items()}}
    return new_state, metrics


def make_update_step(config: Config, optimizer, state_shardings, mesh):
    """The jitted update (state donated, `xla_options.TRAINING`); one compile per run (old/ref None or
    arrays by config)."""
    return jax.jit(lambda s, *args: update_step(config, optimizer, s, *args),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0,
                   compiler_options=xla_options.TRAINING)


def make_logprob_fn(config: Config):
    return jax.jit(lambda variables, rows, replay: completion_logprobs(
        config.model, variables, rows, replay=replay, microbatches=config.grpo.microbatches))


# ------------------------------------------------------------------------------ rollout


def generate(config: Config, variables, prompt_tokens_BP, prompt_lengths_B, *, rng, temperature: float,
             record_experts: bool):
    """The inference engine on the current parameters: (completion tokens [B, Lc], lengths [B],
    ReplayIds over the [prompt + completion] columns or None), tokens and lengths on the host."""
    from dsjax import inference

    g = config.grpo
    result = inference.generate_tokens(
        config.model, variables, jnp.asarray(prompt_tokens_BP), jnp.asarray(prompt_lengths_B),
        max_new_tokens=g.max_completion_length, rng=rng, temperature=temperature, top_k=g.top_k, top_p=g.top_p,
        eos_id=config.model.eos_token_id, record_experts=record_experts)
    tokens, lengths = jax.device_get((result.tokens, result.lengths))
    return np.asarray(tokens), np.asarray(lengths), (result.replay if record_experts else None)


def _place_replay(replay, mesh, batch: int, length: int):
    """The engine's ReplayIds, checked against the update layout and sharded over the batch."""
    if replay is None or replay.moe is None:
        return replay
    if replay.moe.shape[1:3] != (batch, length):
        raise ValueError(f"router replay: the engine recorded experts of shape {replay.moe.shape}; expected "
                         f"[layers, {batch}, {length}, k] (prompt + completion columns)")
    moe = jax.device_put(replay.moe.astype(jnp.int32), NamedSharding(mesh, P(None, shd.BATCH, None, None)))
    mtp = tuple(None if r is None else jax.device_put(r.astype(jnp.int32), shd.batch_sharding(mesh, 3))
                for r in replay.mtp)
    return ReplayIds(moe, mtp)


def evaluate(config: Config, variables, tokenizer, problems) -> dict:
    """Greedy held-out metrics: heldout_accuracy (mean accuracy_reward) and heldout_format."""
    g = config.grpo
    acc, fmt = [], []
    for start in range(0, len(problems), g.eval_batch_size):
        chunk = problems[start:start + g.eval_batch_size]
        padded = chunk + [chunk[0]] * (g.eval_batch_size - len(chunk))  # one shape, one compile
        tokens, lengths = encode_prompts(tokenizer, [p.prompt for p in padded], g.max_prompt_length)
        out, out_lengths, _ = generate(config, variables, tokens, lengths, rng=jax.random.PRNGKey(0),
                                       temperature=0.0, record_experts=False)
        texts = decode_completions(tokenizer, out, out_lengths)[:len(chunk)]
        acc += [rewards.accuracy_reward(t, p.answer) for t, p in zip(texts, chunk)]
        fmt += [rewards.format_reward(t) for t in texts]
    return {"heldout_accuracy": float(np.mean(acc)), "heldout_format": float(np.mean(fmt))}


# ------------------------------------------------------------------------------ loop


def train_grpo(config: Config, workdir: str, *, progress: bool = True,
               mesh: Optional[jax.sharding.Mesh] = None) -> dict:
    """Runs GRPO from grpo.init_checkpoint (or resumes from workdir); returns the last logged row."""
    mesh = mesh or shd.make_mesh(config.mesh)
    config = resolve_config(config, mesh.size)
    check_mesh(config, mesh)
    g = config.grpo
    lead = jax.process_index() == 0
    metrics_path = start_workdir(workdir, config)

    tokenizer = make_tokenizer(config.data.tokenizer)
    if tokenizer.eos_id != config.model.eos_token_id:
        raise ConfigError(f"config field 'model.eos_token_id': {config.model.eos_token_id} differs from the "
                          f"tokenizer's eos id {tokenizer.eos_id}")
    optimizer = make_grpo_optimizer(config)
    shardings = state_lib.shardings(config, optimizer, mesh)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=g.keep_checkpoints,
                                         every=g.checkpoint_every)
    start = 0
    if checkpointer.latest_step() is not None:
        state, extra = checkpointer.restore(abstract_state=state_lib.abstract(config, optimizer, mesh))
        start = int(extra["step"])
    else:
        state = initial_state(config, optimizer, mesh)
    ref_variables = None
    if g.beta > 0:  # the frozen reference: the initial parameters
        params, router = (state.params, state.router) if start == 0 else initial_params(config, mesh)
        ref_variables = jax.tree_util.tree_map(jnp.copy, {"params": params, **router})

    update_fn = make_update_step(config, optimizer, shardings, mesh)
    logprob_fn = make_logprob_fn(config)
    heldout = heldout_problems(config.data, g.heldout_eval_size) if g.heldout_eval_size else []
    horizon = g.stop_at_step or g.steps
    rows_sharding = shd.batch_sharding(mesh, 2)
    n_rows = g.prompts_per_step * g.num_generations

    def log(row):
        if lead:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    last: dict = {}
    bar = tqdm(total=horizon, initial=start, desc="grpo", disable=not (progress and lead), dynamic_ncols=True)
    with ckpt_lib.catch_sigterm(), jax.set_mesh(mesh), rewards.RewardRunner(
            g.reward_funcs, timeout_s=g.reward_timeout_s) as runner:
        if start == 0 and heldout:
            t = time.perf_counter()
            last = {"step": 0, **evaluate(config, state.variables(), tokenizer, heldout),
                    "eval_s": time.perf_counter() - t}
            log(last)
            bar.set_postfix(heldout=f"{last['heldout_accuracy']:.3f}")
        for step in range(start + 1, horizon + 1):
            t0 = time.perf_counter()
            problems = step_problems(config.data, step, g.prompts_per_step)
            prompts = [p.prompt for p in problems for _ in range(g.num_generations)]  # row = prompt·G + j
            answers = [p.answer for p in problems for _ in range(g.num_generations)]
            prompt_tokens, prompt_lengths = encode_prompts(tokenizer, prompts, g.max_prompt_length)
            completion_tokens, lengths, replay = generate(
                config, state.variables(), prompt_tokens, prompt_lengths, rng=jax.random.fold_in(state.rng, step),
                temperature=g.temperature, record_experts=g.router_replay)
            t1 = time.perf_counter()

            texts = decode_completions(tokenizer, completion_tokens, lengths)
            scores = runner.score(texts, answers)
            total_B = sum(w * np.asarray(scores[n], np.float64) for n, w in zip(g.reward_funcs, g.reward_weights))
            rewards_PG = np.asarray(total_B, np.float32).reshape(g.prompts_per_step, g.num_generations)
            adv_B = np.asarray(grpo.group_advantages(rewards_PG, g.scale_rewards)).reshape(-1)
            accuracy = scores["accuracy"] if "accuracy" in scores else [
                rewards.accuracy_reward(t, a) for t, a in zip(texts, answers)]
            batch = build_update_batch(prompt_tokens, prompt_lengths, completion_tokens, lengths,
                                       g.max_completion_length, tokenizer.pad_id)
            t2 = time.perf_counter()

            rows = {k: jax.device_put(v, rows_sharding) for k, v in batch.arrays().items()}
            adv = jax.device_put(adv_B.astype(np.float32), shd.batch_sharding(mesh, 1))
            replay = _place_replay(replay, mesh, n_rows, batch.tokens.shape[1])
            old_logp = logprob_fn(state.variables(), rows, replay) if g.num_iterations > 1 else None
            ref_logp = logprob_fn(ref_variables, rows, replay) if g.beta > 0 else None
            jax.block_until_ready((old_logp, ref_logp))
            t3 = time.perf_counter()

            history = []
            for _ in range(g.num_iterations):
                state, metrics = update_fn(state, rows, replay, old_logp, ref_logp, adv)
                history.append(metrics)
            history = [to_python(m) for m in history]
            t4 = time.perf_counter()

            stop = step == horizon or ckpt_lib.preempted()
            evaluated = bool(heldout) and (step % g.eval_every == 0 or step == horizon)
            if step % g.log_every == 0 or stop or evaluated:
                row = {"step": step, **{k: float(np.mean([h[k] for h in history])) for k in history[0]},
                       **{k: float(v) for k, v in grpo.reward_metrics(rewards_PG, lengths).items()},
                       "accuracy": float(np.mean(accuracy)),
                       **{f"reward_{n.replace(':', '.')}": float(np.mean(v)) for n, v in scores.items()},
                       "reward_timeouts": sum(runner.timeouts.values()),
                       "reward_errors": sum(runner.errors.values()),
                       "generation_s": t1 - t0, "scoring_s": t2 - t1, "reference_s": t3 - t2,
                       "update_s": t4 - t3, "rollout_tokens_per_s": float(lengths.sum()) / max(t1 - t0, 1e-9)}
                if evaluated:
                    t5 = time.perf_counter()
                    row.update(evaluate(config, state.variables(), tokenizer, heldout))
                    row["eval_s"] = time.perf_counter() - t5
                row["step_s"] = time.perf_counter() - t0
                log(row)
                last = row
                postfix = {"reward": f"{row['reward_mean']:.3f}", "acc": f"{row['accuracy']:.3f}"}
                if evaluated:
                    postfix["heldout"] = f"{row['heldout_accuracy']:.3f}"
                bar.set_postfix(postfix)
            bar.update(1)
            checkpointer.save(step, state, {"step": step}, force=stop)
            if stop:
                break
    bar.close()
    checkpointer.close()
    if lead:
        plot_metrics(metrics_path, PLOT_KEYS, os.path.join(workdir, "grpo.png"), title="dsjax GRPO")
        plot_metrics(metrics_path, STATS_KEYS, os.path.join(workdir, "grpo_stats.png"), title="dsjax GRPO")
    return last

"""The GRPO loop: rollout layout, completion log-probs, the update, one sharded step, resume."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import presets
from dsjax import checkpoint as ckpt_lib
from dsjax import sharding as shd
from dsjax.config import ConfigError, MeshConfig, replace
from dsjax.data import ByteTokenizer, train_problem
from dsjax.model import ReplayIds, Transformer
from dsjax.plotting import read_metrics
from dsjax.rl import loop, rewards, rollout
from dsjax.rl.logprobs import completion_logprobs
from dsjax.train import state as state_lib

LOGP_ATOL = 1e-5  # float32 log-probs, same math in two orders
UPDATE_RTOL = 1e-5  # per-leaf ||g1 - g2|| / ||g1|| of two equivalent on-policy gradients
RESUME_RTOL = 1e-6  # resumed vs uninterrupted metrics (same programs, same inputs)
TIMING_KEYS = ("generation_s", "scoring_s", "reference_s", "update_s", "step_s", "eval_s", "rollout_tokens_per_s")


def digits_reward(completion, answer):
    """A reward a random-init policy earns unevenly: the fraction of its characters that are digits."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def _grpo_config(mesh=(2, 2, 2), **overrides):
    c = presets.load("grpo_tiny")
    c = replace(c, mesh=MeshConfig(*mesh), **{
        "grpo.steps": 2, "grpo.prompts_per_step": 2, "grpo.num_generations": 4, "grpo.max_prompt_length": 24,
        "grpo.max_completion_length": 16, "grpo.heldout_eval_size": 8, "grpo.eval_batch_size": 8,
        "grpo.eval_every": 100, "grpo.reward_funcs": ("digits", "accuracy"), "grpo.reward_weights": (1.0, 1.0),
        "grpo.learning_rate": 1e-3})
    return replace(c, **overrides) if overrides else c


# ------------------------------------------------------------------------------ rollout layout


def test_update_batch_layout():
    tok = ByteTokenizer()
    prompt_BP, plen_B = rollout.encode_prompts(tok, ["ab", "abcd"], max_prompt_length=6)
    pad, bos, eos = tok.pad_id, tok.bos_id, tok.eos_id
    np.testing.assert_array_equal(prompt_BP, [[pad, pad, pad, bos, 97, 98], [pad, bos, 97, 98, 99, 100]])
    np.testing.assert_array_equal(plen_B, [3, 5])
    # the engine's completions: 5 wide, padded after EOS with junk; the batch pads them to 7
    completion_BC = np.array([[10, 11, eos, 7, 7], [12, 9, 9, 9, 9]], np.int32)
    batch = rollout.build_update_batch(prompt_BP, plen_B, completion_BC, [3, 1], max_completion_length=7,
                                       pad_id=pad)
    assert batch.tokens.shape == (2, 13) and batch.completion_mask.shape == (2, 7) and batch.prompt_length == 6
    np.testing.assert_array_equal(batch.tokens, [[pad, pad, pad, bos, 97, 98, 10, 11, eos, pad, pad, pad, pad],
                                                 [pad, bos, 97, 98, 99, 100, 12, pad, pad, pad, pad, pad, pad]])
    np.testing.assert_array_equal(batch.positions, [[0, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0],
                                                    [0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.segment_ids, [[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
                                                      [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.completion_mask, [[1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    assert rollout.decode_completions(tok, completion_BC, [3, 1]) == ["\n\x0b", "\x0c"]
    with pytest.raises(ConfigError, match="grpo.max_prompt_length"):
        rollout.encode_prompts(tok, ["abcdefg"], max_prompt_length=6)
    with pytest.raises(ValueError, match="max_completion_length"):
        rollout.build_update_batch(prompt_BP, plen_B, completion_BC, [6, 1], max_completion_length=7, pad_id=pad)
    with pytest.raises(ValueError, match="max_completion_length"):
        rollout.build_update_batch(prompt_BP, plen_B, completion_BC, [3, 1], max_completion_length=4, pad_id=pad)


def test_step_problems_are_deterministic_and_disjoint_across_steps():
    data = presets.load("grpo_tiny").data
    step2 = rollout.step_problems(data, 2, 3)
    assert step2 == [train_problem(data, i) for i in (3, 4, 5)]
    assert rollout.step_problems(data, 2, 3) == step2 and rollout.step_problems(data, 1, 3)[0] != step2[0]


# ------------------------------------------------------------------------------ log-probs and update


@pytest.fixture(scope="module")
def one_device_setup():
    config = _grpo_config(mesh=(1, 1, 1))
    mesh = shd.make_mesh(config.mesh)
    state = loop.initial_state(config, loop.make_grpo_optimizer(config), mesh)  # random init, unboxed
    tok = ByteTokenizer()
    r = np.random.RandomState(0)
    prompt_BP, plen_B = rollout.encode_prompts(tok, ["What is 1 + 2?\n", "7?\n", "What is 12 - 5?\n", "x"] * 2, 24)
    completion_BC = r.randint(0, 256, (8, 16)).astype(np.int32)
    batch = rollout.build_update_batch(prompt_BP, plen_B, completion_BC, [16, 3, 9, 1, 12, 16, 5, 7], 16, tok.pad_id)
    return config, mesh, state, {k: jnp.asarray(v) for k, v in batch.arrays().items()}


def test_completion_logprobs_equal_log_softmax_of_apply(one_device_setup):
    config, mesh, state, rows = one_device_setup
    variables = state.variables()

    def apply(v, r):
        with shd.activation_rules():
            return Transformer(config.model).apply(v, r["tokens"], r["positions"], r["segment_ids"],
                                                   full_output=True)

    with jax.set_mesh(mesh):
        out = jax.jit(apply)(variables, rows)
    lp = rows["tokens"].shape[1] - rows["completion_mask"].shape[1]
    logsm = jax.nn.log_softmax(out.logits, axis=-1)
    direct_BC = np.stack([[float(logsm[b, lp + j - 1, rows["tokens"][b, lp + j]]) for j in range(16)]
                          for b in range(8)])
    mask = np.asarray(rows["completion_mask"], bool)
    replay = ReplayIds(out.moe_stats.expert_ids_BTK, ())  # its own experts: replay must change nothing
    with jax.set_mesh(mesh):
        for microbatches, rep in ((1, None), (4, replay)):
            ours = jax.jit(lambda v, r, rp, m=microbatches: completion_logprobs(
                config.model, v, r, replay=rp, microbatches=m))(variables, rows, rep)
            np.testing.assert_allclose(np.asarray(ours)[mask], direct_BC[mask], atol=LOGP_ATOL)


def test_on_policy_gradient_equals_gradient_with_explicit_old_logprobs(one_device_setup):
    """mu = 1 skips the old-policy forward (old = current detached, as TRL): the same gradient as
    passing the sampling policy's log-probs."""
    config, mesh, state, rows = one_device_setup
    adv = jnp.asarray([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -2.0, 0.3])
    num_tokens = rows["completion_mask"].sum()

    def both(params):
        old = completion_logprobs(config.model, {"params": params, **state.router}, rows)
        grad = jax.grad(lambda p, o: loop.grpo_objective(config, p, state.router, rows, None, o, None, adv,
                                                         num_tokens, 1)[0])
        return grad(params, None), grad(params, old)

    with jax.set_mesh(mesh):
        implicit, explicit = jax.device_get(jax.jit(both)(state.params))
    norms = [np.linalg.norm(a) for a in jax.tree_util.tree_leaves(implicit)]
    assert max(norms) > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(implicit), jax.tree_util.tree_leaves(explicit)):
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)
        assert rel <= UPDATE_RTOL, (jax.tree_util.keystr(path), rel)


# ------------------------------------------------------------------------------ the loop


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full-featured config (mu = 2, beta > 0, MTP term, 2 microbatches, router replay) on a (2,2,2)
    mesh, run (a) for one step, stopped, then resumed for the second, and (b) uninterrupted."""
    config = _grpo_config(**{"grpo.num_iterations": 2, "grpo.beta": 0.04, "grpo.mtp_weight": 0.1,
                             "grpo.microbatches": 2, "grpo.router_replay": True})
    stopped, whole = str(tmp_path_factory.mktemp("stopped")), str(tmp_path_factory.mktemp("whole"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rewards.BUILTIN_REWARDS, "digits", digits_reward)
        first = loop.train_grpo(replace(config, **{"grpo.stop_at_step": 1}), stopped, progress=False)
        loop.train_grpo(config, stopped, progress=False)
        loop.train_grpo(config, whole, progress=False)
    return config, stopped, whole, first


def test_one_sharded_step_runs_and_changes_params(runs):
    config, stopped, _, first = runs
    assert first["step"] == 1 and first["frac_reward_zero_std"] < 1.0  # a learning signal existed
    for key in ("loss", "reward_mean", "reward_std", "accuracy", "heldout_accuracy", "clip_fraction", "kl",
                "entropy", "completion_length_mean", "frac_reward_zero_std", "mtp_loss", *TIMING_KEYS):
        assert np.isfinite(first[key]), key
    mesh = shd.make_mesh(config.mesh)
    config = loop.resolve_config(config, mesh.size)
    optimizer = loop.make_grpo_optimizer(config)
    before = loop.initial_state(config, optimizer, mesh)
    with ckpt_lib.Checkpointer(os.path.join(stopped, "checkpoints"), keep=5) as ckpt:
        after, extra = ckpt.restore(1, abstract_state=state_lib.abstract(config, optimizer, mesh))
    assert extra["step"] == 1 and int(after.step) == 2  # mu = 2 optimizer steps
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(before.params)),
                                                         jax.tree_util.tree_leaves(jax.device_get(after.params)))]
    assert all(changed)
    for a, b in zip(jax.tree_util.tree_leaves(before.router), jax.tree_util.tree_leaves(after.router)):
        np.testing.assert_array_equal(a, b)  # the router bias stays frozen during RL
    rows = read_metrics(os.path.join(stopped, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2] and "heldout_accuracy" in rows[0]
    assert os.path.exists(os.path.join(stopped, "grpo.png"))


def test_resume_gives_the_same_next_step(runs):
    _, stopped, whole, _ = runs
    resumed = read_metrics(os.path.join(stopped, "metrics.jsonl"))
    uninterrupted = read_metrics(os.path.join(whole, "metrics.jsonl"))
    assert [r["step"] for r in uninterrupted] == [0, 1, 2]
    for a, b in zip(resumed[1:], uninterrupted[1:]):
        keys = {k for k in b if k not in TIMING_KEYS and not k.startswith("heldout")}
        assert keys <= set(a)
        for k in sorted(keys):
            np.testing.assert_allclose(a[k], b[k], rtol=RESUME_RTOL, err_msg=f"step {b['step']} {k}")
    assert resumed[2]["heldout_accuracy"] == uninterrupted[2]["heldout_accuracy"]


def test_a_grpo_workdir_loads_for_generation(runs):
    """load_workdir (scripts/generate.py) reads a GRPO run's weights, although its optimizer state
    differs from pretraining's: only params and the router bias are read."""
    config, stopped, _, _ = runs
    mesh = shd.make_mesh(config.mesh)
    config = loop.resolve_config(config, mesh.size)
    optimizer = loop.make_grpo_optimizer(config)
    with ckpt_lib.Checkpointer(os.path.join(stopped, "checkpoints"), keep=5) as ckpt:
        saved, _ = ckpt.restore(2, abstract_state=state_lib.abstract(config, optimizer, mesh))
    _, variables, step = state_lib.load_workdir(stopped)
    assert step == 2
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(saved.variables())),
                    jax.tree_util.tree_leaves(jax.device_get(variables))):
        np.testing.assert_array_equal(a, b)

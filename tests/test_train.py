"""Sharded training: mesh equivalence, resume, NaN skipping, bias balancing, multi-process, no retrace."""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import train_setup
from dsjax import sharding as shd
from dsjax.config import ModelConfig, replace
from dsjax.model.router import Router
from dsjax.train import balance, optimizer as opt, state as st
from dsjax.train.loop import TrainingDiverged, global_batch, train
from dsjax.train.step import loss_and_grads, make_train_step

MESH_GRAD_RTOL = 1e-5  # per leaf ||g1 - g2|| / ||g1||, float32
MULTIPROCESS_RTOL = 1e-6
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _loss_and_grads(mesh_shape):
    config = train_setup.tiny_config(mesh=mesh_shape)
    mesh = shd.make_mesh(config.mesh)
    state = st.create(config, opt.make_optimizer(config.train), mesh, 0)
    with jax.set_mesh(mesh):
        batch = global_batch(mesh, train_setup.random_batch(0))
        out = jax.jit(lambda s, b: loss_and_grads(config, s.params, s.router, b))(state, batch)
        parts, loads, grads = out.parts, out.moe_load, out.grads
        return jax.device_get((parts.total, loads, grads))


@pytest.fixture(scope="module")
def one_device():
    return _loss_and_grads((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_one_device(one_device, mesh_shape):
    loss1, loads1, g1 = one_device
    loss2, loads2, g2 = _loss_and_grads(mesh_shape)
    np.testing.assert_allclose(loss2, loss1, rtol=MESH_GRAD_RTOL)
    np.testing.assert_array_equal(loads2, loads1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g2)):
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(a)), 1e-30)
        assert rel <= MESH_GRAD_RTOL, (jax.tree_util.keystr(path), rel)


def test_nan_batch_leaves_state_bit_identical():
    config = train_setup.tiny_config()
    mesh = shd.make_mesh(config.mesh)
    optimizer = opt.make_optimizer(config.train)
    step = make_train_step(config, optimizer, mesh, st.shardings(config, optimizer, mesh))
    with jax.set_mesh(mesh):
        state = st.create(config, optimizer, mesh, 0)
        state, _ = step(state, global_batch(mesh, train_setup.random_batch(0)))  # non-trivial moments
        before = jax.device_get(state)
        bad = train_setup.random_batch(1)
        bad["loss_mask"][0, 3] = np.nan
        state, metrics = step(state, global_batch(mesh, bad))
        after = jax.device_get(state)
    assert int(metrics["skipped_steps"]) == 1 and int(after.step) == int(before.step) + 1
    for name in ("params", "opt_state", "router"):
        for a, b in zip(jax.tree_util.tree_leaves(getattr(before, name)), jax.tree_util.tree_leaves(getattr(after, name))):
            np.testing.assert_array_equal(a, b)


def test_step_reports_the_pairs_capacity_dispatch_drops():
    """metrics["dropped_pairs"] = Σ over MoE layers and experts of max(0, load − capacity): every
    expert keeps its first `capacity` tokens (all tokens of the batch are real)."""
    config = train_setup.tiny_config(**{"model.moe.dispatch": "capacity", "model.moe.capacity_factor": 0.5})
    mesh = shd.make_mesh(config.mesh)
    optimizer = opt.make_optimizer(config.train)
    step = make_train_step(config, optimizer, mesh, st.shardings(config, optimizer, mesh))
    with jax.set_mesh(mesh):
        state = st.create(config, optimizer, mesh, 0)
        batch = global_batch(mesh, train_setup.random_batch(0))
        out = jax.jit(lambda s, b: loss_and_grads(config, s.params, s.router, b))(state, batch)
        _, metrics = step(state, batch)
    moe = config.model.moe
    tokens = config.train.batch_size * config.data.seq_len
    cap = math.ceil(moe.capacity_factor * tokens * moe.num_experts_per_tok / moe.n_routed_experts)
    loads = np.concatenate([np.asarray(out.moe_load).reshape(-1), *(np.asarray(l) for l in out.mtp_load)])
    want = int(np.maximum(loads - cap, 0).sum())
    assert want > 0 and int(metrics["dropped_pairs"]) == int(out.dropped) == want


def test_no_recompilation_after_first_step():
    config = train_setup.tiny_config()
    mesh = shd.make_mesh(config.mesh)
    optimizer = opt.make_optimizer(config.train)
    from dsjax.train.step import train_step

    traced = chex.assert_max_traces(n=1)(lambda s, b: train_step(config, optimizer, s, b))
    shardings = st.shardings(config, optimizer, mesh)
    step = jax.jit(traced, in_shardings=(shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh):
        state = st.create(config, optimizer, mesh, 0)
        for i in range(3):
            state, _ = step(state, global_batch(mesh, train_setup.random_batch(i)))


def test_the_installed_jaxlib_knows_the_training_xla_options():
    """xla_options.TRAINING names only DebugOptions fields this jaxlib has (jax rejects others): a
    jaxlib that drops one fails here by name, before every train step fails."""
    from dsjax import xla_options

    for name, value in xla_options.TRAINING.items():
        jax.jit(lambda x: x + 1, compiler_options={name: value}).trace(1.0).lower().compile()
    with pytest.raises(Exception, match="xla_gpu_no_such_option"):
        jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_no_such_option": True}).trace(1.0).lower().compile()


def test_bias_update_balances_a_skewed_router():
    """A router whose kernel favours a few experts, fed skewed tokens: γ > 0 evens the load out."""
    c = replace(ModelConfig(hidden_size=16), **{"moe.n_routed_experts": 8, "moe.n_group": 2, "moe.topk_group": 2,
                                                 "moe.num_experts_per_tok": 2})
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(512, 16).astype(np.float32) + 1.0)  # skewed: a shared offset direction
    router = Router(c)
    variables = router.init(jax.random.key(0), x)
    kernel = np.array(nn.unbox(variables)["params"]["kernel"])
    kernel[:, :2] += 0.05  # experts 0 and 1 win for nearly every token
    params = {"kernel": jnp.asarray(kernel)}

    @jax.jit
    def loads(bias):
        routing = router.apply({"params": params, "router": {"bias": bias}}, x)
        return jax.nn.one_hot(routing.expert_ids_NK, 8).sum((0, 1))

    def run(gamma, steps=300):
        bias = jnp.zeros(8)
        for _ in range(steps):
            bias = balance.bias_step(bias, loads(bias), gamma)
        return float(balance.load_ratio(loads(bias)))

    start = float(balance.load_ratio(loads(jnp.zeros(8))))
    balanced, frozen = run(1e-3), run(0.0)
    print(f"max/mean load: start {start:.2f}, γ=1e-3 after 300 steps {balanced:.2f}, γ=0 {frozen:.2f}")
    assert start > 2.5 and frozen == start
    assert balanced < 1.5


def _read_losses(workdir):
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    train(train_setup.tiny_config(**{"train.steps": 8, "train.checkpoint_every": 3}), workdir, progress=False)
    return _read_losses(workdir)


def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    workdir = str(tmp_path)
    config = train_setup.tiny_config(**{"train.steps": 8, "train.checkpoint_every": 3})
    train(replace(config, **{"train.stop_at_step": 4}), workdir, progress=False)
    assert max(_read_losses(workdir)) == 4
    train(config, workdir, progress=False)
    resumed = _read_losses(workdir)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == uninterrupted[step], step  # bitwise on CPU


def test_a_diverging_run_stops_with_the_step_and_the_limit(tmp_path):
    """lr 1e30 turns the params non-finite after the first update; every later step is skipped, and
    the loop raises once more than max_consecutive_skips are in a row (checked one step late,
    between log steps)."""
    config = train_setup.tiny_config(**{"train.steps": 12, "train.learning_rate": 1e30, "train.warmup_steps": 0,
                                        "train.max_consecutive_skips": 2, "train.log_every": 100})
    with pytest.raises(TrainingDiverged, match=r"step [0-9]+: 3 consecutive steps .*max_consecutive_skips=2"):
        train(config, str(tmp_path), progress=False, checkpoints=False)


def test_training_without_checkpoints_saves_none_and_trains_the_same(uninterrupted, tmp_path):
    workdir = str(tmp_path)
    train(train_setup.tiny_config(**{"train.steps": 8, "train.checkpoint_every": 3}), workdir, progress=False,
          checkpoints=False)
    assert _read_losses(workdir) == uninterrupted
    saved = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(saved) or not [d for d in os.listdir(saved) if d.isdigit()]


def test_sigterm_saves_and_resumes(tmp_path):
    def command(workdir):
        return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={ROOT}/configs/tiny.py",
                f"--workdir={workdir}", "--config.train.steps=8", "--config.train.checkpoint_every=3",
                "--config.train.log_every=1", "--config.data.seq_len=64", "--config.train.batch_size=8",
                "--config.mesh.data=1"]

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    ref = subprocess.run(command(tmp_path / "full"), env=env, capture_output=True, timeout=240)
    assert ref.returncode == 0, ref.stderr.decode()[-3000:]
    uninterrupted = _read_losses(tmp_path / "full")
    workdir = str(tmp_path / "stopped")
    cmd = command(workdir)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    stopped = max(_read_losses(workdir))
    assert stopped < 8, "SIGTERM arrived too late to test anything"
    from dsjax.checkpoint import Checkpointer
    assert Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).latest_step() == stopped
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    resumed = _read_losses(workdir)
    for step in range(stopped + 1, 9):
        assert resumed[step] == uninterrupted[step], step


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_and_resume_their_own_data_shards(tmp_path):
    port = str(_free_port())
    out = str(tmp_path / "loss.txt")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_child.py"), str(i), port, out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    for p in procs:
        log = p.communicate(timeout=400)[0].decode()
        assert p.returncode == 0, log[-3000:]
    two, data_state_processes, resumed_equal = ast.literal_eval(open(out).read())
    assert data_state_processes == [0, 1]  # each process's own iterator state, in order
    assert resumed_equal  # process 0 resumed its shard from the gathered list
    one, _, _ = _loss_and_grads((2, 2, 2))
    assert abs(two - float(one)) / abs(float(one)) <= MULTIPROCESS_RTOL


def test_bf16_moments_store_both_moments_in_bf16_and_track_float32():
    """train.bf16_moments (V3 §3.3.3): mu and nu held in bf16, updates computed in float32; after
    a few steps the parameters stay within bf16 rounding of the float32-moment optimizer's."""
    import optax
    from dsjax.config import TrainConfig
    from dsjax.train.optimizer import make_optimizer

    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "norm": {"scale": jnp.ones((32,))}}
    results = {}
    for bf16 in (False, True):
        opt = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_steps=0, steps=10, bf16_moments=bf16))
        state, p = opt.init(params), params
        adam = next(s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                    if isinstance(s, optax.ScaleByAdamState))
        dtype = jnp.bfloat16 if bf16 else jnp.float32
        assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves((adam.mu, adam.nu)))
        for i in range(5):
            grads = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.key(i), x.shape), p)
            updates, state = opt.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results[bf16] = p
    moved = float(jnp.abs(results[False]["w"] - params["w"]).max())
    diff = float(jnp.abs(results[True]["w"] - results[False]["w"]).max())
    assert moved > 1e-2 and diff < 0.02 * moved, (moved, diff)

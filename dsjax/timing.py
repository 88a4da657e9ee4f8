"""Timing for the benchmarks (scripts/bench_*.py): seconds per call of a jitted function after a
warm-up call, and seconds per step of the library's real training step (jitted, state donated,
two warm-up steps) on a synthetic batch."""

from __future__ import annotations

import time

import jax
import numpy as np

from dsjax import sharding as shd
from dsjax.config import Config
from dsjax.train import optimizer as opt, state as st
from dsjax.train.loop import global_batch, to_python
from dsjax.train.step import make_train_step


def seconds_per_call(fn, *args, repeat: int = 5) -> float:
    """Mean wall seconds of `fn(*args)` over `repeat` calls, after one warm-up call; the outputs
    are waited for, so asynchronous dispatch is not timed as free."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeat


def train_runner(config: Config):
    """(run, first-call seconds): `run()` does one step of the library's jitted train step (state
    donated and carried inside) on one random [batch_size, seq_len] batch, from a fresh state on the
    config's mesh, and returns the step's metrics; the first call (compile) is made here."""
    mesh = shd.make_mesh(config.mesh)
    optimizer = opt.make_optimizer(config.train)
    state = st.create(config, optimizer, mesh, 0)
    step = make_train_step(config, optimizer, mesh, st.shardings(config, optimizer, mesh))
    b, t = config.train.batch_size, config.data.seq_len
    r = np.random.RandomState(0)
    tokens = r.randint(0, config.model.vocab_size, (b, t + 1)).astype(np.int32)
    local = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, t), np.float32),
             "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
    with jax.set_mesh(mesh):
        batch = global_batch(mesh, local)
    carry = [state]

    def run():
        with jax.set_mesh(mesh):
            carry[0], metrics = step(carry[0], batch)
        return metrics

    t0 = time.perf_counter()
    jax.block_until_ready(run())
    return run, time.perf_counter() - t0


def step_seconds(config: Config, steps: int) -> tuple[float, float, dict]:
    """(seconds per step, first-call seconds (compile), the last step's metrics as Python numbers)
    of `train_runner`'s step, after two warm-up steps."""
    run, compile_s = train_runner(config)
    for _ in range(2):
        metrics = run()
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        metrics = run()
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, compile_s, to_python(metrics)

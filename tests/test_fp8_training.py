"""A tiny training run with fp8=block ends within 1% of the fp8=none loss (same steps, same data)."""

from __future__ import annotations

import jax
import numpy as np

import train_setup
from dsjax import sharding as shd
from dsjax.train import optimizer as opt, state as st
from dsjax.train.loop import global_batch
from dsjax.train.step import make_train_step

FINAL_LOSS_RTOL = 0.01
STEPS = 30


def final_loss(mode: str) -> float:
    config = train_setup.tiny_config(**{"model.fp8": mode, "train.steps": STEPS, "train.warmup_steps": 5})
    mesh = shd.make_mesh(config.mesh)
    optimizer = opt.make_optimizer(config.train)
    step = make_train_step(config, optimizer, mesh, st.shardings(config, optimizer, mesh))
    losses = []
    with jax.set_mesh(mesh):
        state = st.create(config, optimizer, mesh, 0)
        for i in range(STEPS):
            # a fixed small pool of batches, so the loss falls well below its starting value
            state, metrics = step(state, global_batch(mesh, train_setup.random_batch(i % 4, vocab=32)))
            losses.append(float(metrics["loss"]))
    return float(np.mean(losses[-5:])), losses[0]


def test_fp8_block_training_tracks_bf16_loss():
    none, first = final_loss("none")
    block, _ = final_loss("block")
    print(f"loss: start {first:.4f}; after {STEPS} steps fp8=none {none:.4f}, fp8=block {block:.4f}, "
          f"relative difference {abs(block - none) / none:.3%}")
    assert none < 0.8 * first  # training made progress, so the comparison means something
    assert abs(block - none) / none < FINAL_LOSS_RTOL

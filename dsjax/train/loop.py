"""The training loop: mesh, sharded state, grain data, orbax checkpoints, metrics, resume.

`train(config, workdir)` runs steps up to `train.stop_at_step` (or `train.steps`, the horizon that
shapes the schedule and data order). A workdir holding a checkpoint resumes from it — state, data
iterator and step — onto whatever mesh this run has. Checkpoints are saved every
`train.checkpoint_every` steps, at the end, and when SIGTERM arrives (the loop finishes the current
step, saves and returns, as a preemption would). The workdir gets DESIGN.md's files: config.json,
metrics.jsonl, checkpoints/ and loss.png.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from dsjax import checkpoint as ckpt_lib
from dsjax import sharding as shd
from dsjax.config import Config, to_dict, validate
from dsjax.data import make_tokenizer, make_train_iterator
from dsjax.distributed import allgather_json
from dsjax.plotting import plot_metrics
from dsjax.train import flops, state as state_lib
from dsjax.train.optimizer import make_optimizer
from dsjax.train.step import BATCH_KEYS, make_train_step

LOG_KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "expert_load_max_over_mean")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


def check_skips(step: int, metrics: dict, max_consecutive: int) -> None:
    """Raises TrainingDiverged when more than `max_consecutive` steps in a row were skipped. The loop
    checks each step after queueing the next one (a host read of the current step's metrics would
    wait for it and leave the device idle while the next batch is prepared), so a divergence is
    raised one step late; the skipped steps left params untouched, so they are still those of the
    last good step."""
    consecutive = int(metrics["consecutive_skips"])
    if consecutive > max_consecutive:
        raise TrainingDiverged(
            f"step {step}: {consecutive} consecutive steps had a non-finite loss or gradient "
            f"(train.max_consecutive_skips={max_consecutive}); params are those of the last good step")


def global_batch(mesh, local: dict) -> dict:
    """This process's rows -> global arrays sharded over ('data', 'expert')."""
    sharding = shd.batch_sharding(mesh, 2)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k])) for k in BATCH_KEYS}


def to_python(metrics: dict) -> dict:
    """Device metrics as JSON-ready Python numbers (vectors as lists rounded to 4 places)."""
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else [round(float(x), 4) for x in v.reshape(-1)]
    return out


def start_workdir(workdir: str, config: Config) -> str:
    """Creates the run directory, writes the resolved config.json (process 0) and returns the path
    of metrics.jsonl (DESIGN.md "Files a run writes")."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(to_dict(config), f, indent=2)
    return os.path.join(workdir, "metrics.jsonl")


def own_data_state(saved) -> dict:
    """This process's data-iterator state from a checkpoint's list over processes (a checkpoint
    written before the list existed holds one dict)."""
    if isinstance(saved, dict):
        return saved
    if len(saved) != jax.process_count():
        raise ValueError(f"the checkpoint's data state comes from {len(saved)} processes and this run has "
                         f"{jax.process_count()}: each process reads its own data shard, so a run resumes on "
                         f"the same number of processes")
    return saved[jax.process_index()]


def train(config: Config, workdir: str, *, progress: bool = True, mesh: Optional[jax.sharding.Mesh] = None,
          checkpoints: bool = True) -> dict:
    """Trains from scratch or resumes from workdir; returns the last logged metrics. With
    `checkpoints=False` nothing is saved (runs kept only for their metrics, e.g. comparisons: a
    configs/small.py checkpoint is ~34 GB)."""
    mesh = mesh or shd.make_mesh(config.mesh)
    config = validate(config, mesh.size)
    t = config.train
    lead = jax.process_index() == 0
    metrics_path = start_workdir(workdir, config)

    tokenizer = make_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"config field 'model.vocab_size': {config.model.vocab_size} is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")
    data = make_train_iterator(config.data, tokenizer, batch_size=t.batch_size, seq_len=config.data.seq_len)
    optimizer = make_optimizer(t)
    shardings = state_lib.shardings(config, optimizer, mesh)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                                         every=t.checkpoint_every)
    start = 0
    if checkpointer.latest_step() is not None:
        state, extra = checkpointer.restore(abstract_state=state_lib.abstract(config, optimizer, mesh))
        data.set_state(own_data_state(extra["data"]))
        start = int(extra["step"])
    else:
        state = state_lib.create(config, optimizer, mesh, t.seed)
    step_fn = make_train_step(config, optimizer, mesh, shardings)
    horizon = t.stop_at_step or t.steps
    use_mtp = config.model.mtp.num_nextn_predict_layers > 0 and t.mtp_weight > 0
    on_cpu = jax.devices()[0].platform == "cpu"
    tokens_per_step = t.batch_size * config.data.seq_len

    last: dict = {}
    bar = tqdm(total=horizon, initial=start, desc="train", disable=not (progress and lead), dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    with ckpt_lib.catch_sigterm(), jax.set_mesh(mesh):
        previous = None  # the last step's (step, metrics), read once the next step is queued
        for step in range(start + 1, horizon + 1):
            batch = global_batch(mesh, next(data))
            state, metrics = step_fn(state, batch)
            window_steps += 1
            if previous is not None:  # reading this step's metrics now would idle the device
                check_skips(*previous, t.max_consecutive_skips)
            previous = (step, metrics)
            stop = step == horizon or ckpt_lib.preempted()
            if step % t.log_every == 0 or stop:
                check_skips(*previous, t.max_consecutive_skips)  # the log reads the metrics anyway
                previous = None
                row = {"step": step, **to_python(metrics)}
                seconds = (time.perf_counter() - window_start) / window_steps
                row["tokens_per_s"] = tokens_per_step / seconds
                if not on_cpu:
                    row["mfu"] = flops.mfu(config.model, t.batch_size, config.data.seq_len, use_mtp, seconds,
                                           t.peak_tflops, mesh.size)
                window_start, window_steps = time.perf_counter(), 0
                if lead:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                last = row
            bar.update(1)
            if checkpoints and checkpointer.due(step, force=stop):  # every process's iterator state, gathered
                checkpointer.save(step, state, {"step": step, "data": allgather_json(data.get_state())}, force=stop)
            if stop:
                break
    bar.close()
    checkpointer.close()
    if lead:
        plot_metrics(metrics_path, LOG_KEYS, os.path.join(workdir, "loss.png"), title="dsjax training")
    return last

"""Multi-process start-up through JAX's own distributed runtime.

One process per host (or per GPU); all processes build the same ('data', 'expert', 'tensor') mesh
over every device of every process. `jax.distributed.initialize()` auto-detects SLURM and TPU pod
environments; elsewhere pass the coordinator address, process count and id. CPU runs (the tests)
use gloo collectives.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np


def wants_distributed(mode: str, coordinator: Optional[str]) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return bool(coordinator) or int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ


def maybe_initialize(mode: str = "auto", coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> None:
    if not wants_distributed(mode, coordinator):
        return
    if jax.config.jax_platforms in (None, "", "cpu") and coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def allgather_json(obj: Any) -> list:
    """Every process's JSON-serializable `obj`, in process order ([obj] in a single-process run).

    Checkpoints are written by process 0, but each process reads its own data shard: the training
    loop gathers every process's iterator state into the checkpoint with this, so a multi-host run
    resumes each shard where it stopped."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(rows[i, :lengths[i]]).decode()) for i in range(len(lengths))]

"""Multi-process start-up through JAX's own distributed runtime.

One process per host (or per GPU); all processes build the same ('data', 'expert', 'tensor') mesh
over every device of every process. `jax.distributed.initialize()` auto-detects SLURM and TPU pod
environments; elsewhere pass the coordinator address, process count and id. CPU runs (the tests)
use gloo collectives.
"""

from __future__ import annotations

import os
from typing import Optional

import jax


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

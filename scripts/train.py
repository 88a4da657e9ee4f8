"""Train a DeepSeek-V3-style model.

    python scripts/train.py --config=configs/tiny.py --workdir=/tmp/dsjax-tiny \
        [--config.train.steps=300] [--config.mesh.data=2] [--config.data.source=stdlib]

Multi-host (GPU clusters under SLURM, TPU pods): launch one process per host; with
--distributed=auto (the default) jax.distributed.initialize() runs whenever the environment says
there are several processes (SLURM_NTASKS > 1, a TPU pod, or --coordinator_address given).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py preset", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, plots)", required=True)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "call jax.distributed.initialize")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from dsjax.config import from_config_dict
    from dsjax.distributed import maybe_initialize

    config = from_config_dict(_CONFIG.value)  # validates before anything compiles
    maybe_initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from dsjax.train.loop import train

    last = train(config, _WORKDIR.value)
    print({k: v for k, v in last.items() if not isinstance(v, list)})


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)

"""GRPO (DeepSeek-R1's RL stage) on the embedded arithmetic task, from a scripts/train.py checkpoint.

    python scripts/train.py --config=configs/tiny.py --workdir=/tmp/dsjax-pre \
        --config.train.steps=3000 --config.train.stop_at_step=2000
    python scripts/grpo.py --config=configs/grpo_tiny.py --workdir=/tmp/dsjax-grpo \
        --config.grpo.init_checkpoint=/tmp/dsjax-pre [--config.grpo.steps=200]

The model comes from the init checkpoint's config.json and checkpoints/; `--config.grpo.*` and
`--config.data.*` (the task's difficulty) apply to this run. Re-running with the same workdir
resumes. Writes metrics.jsonl, grpo.png (reward, rollout and held-out accuracy) and checkpoints/.
configs/grpo_tiny.py explains the recipe; BENCHMARKS.md ("GRPO on CPU") has its measured run.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py preset", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, plots)", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from dsjax.config import from_config_dict

    config = from_config_dict(_CONFIG.value)  # validates before anything compiles
    from dsjax.rl.loop import train_grpo

    last = train_grpo(config, _WORKDIR.value)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()})


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)

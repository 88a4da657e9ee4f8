"""grpo_tiny: GRPO on the embedded arithmetic task from a configs/tiny.py checkpoint, on CPU.

    python scripts/train.py --config=configs/tiny.py --workdir=/tmp/dsjax-pre --config.train.steps=1500
    python scripts/grpo.py --config=configs/grpo_tiny.py --workdir=/tmp/dsjax-grpo \
        --config.grpo.init_checkpoint=/tmp/dsjax-pre

The model (architecture and weights) comes from the init checkpoint; this preset sets the task and
the RL hyperparameters. Expect held-out accuracy (greedy, 512 held-out problems) to rise by >= 20
points within 30 minutes on a 2-core CPU (numbers in BENCHMARKS.md).
"""

import importlib.util
import os


def _tiny():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
    spec = importlib.util.spec_from_file_location("dsjax_preset_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _tiny()  # the tiny model, replaced by the init checkpoint's when grpo.init_checkpoint is set
    g = c.grpo
    g.steps = 200
    g.prompts_per_step = 16
    g.num_generations = 8
    g.max_prompt_length = 32
    g.max_completion_length = 64
    g.temperature = 1.0
    g.learning_rate = 1e-4
    g.num_iterations = 1
    g.beta = 0.0
    g.aggregation = "token"
    g.reward_funcs = ("accuracy", "format")
    g.reward_weights = (1.0, 0.2)
    g.mtp_weight = 0.1
    g.eval_every = 20
    g.heldout_eval_size = 512
    g.eval_batch_size = 256
    g.checkpoint_every = 50
    return c

"""grpo_tiny: GRPO on the embedded arithmetic task from a configs/tiny.py checkpoint, on CPU.

    python scripts/train.py --config=configs/tiny.py --workdir=/tmp/dsjax-pre \
        --config.train.steps=3000 --config.train.stop_at_step=2000
    python scripts/grpo.py --config=configs/grpo_tiny.py --workdir=/tmp/dsjax-grpo \
        --config.grpo.init_checkpoint=/tmp/dsjax-pre

The pretraining (default task: up to 3 terms, + and -) stops at step 2000 of a 3000-step schedule,
where the tiny model has just begun to add: about 30% greedy accuracy on two-term sums. The model
(architecture and weights) comes from that checkpoint; this preset sets the RL task and
hyperparameters. The RL task is two-term addition (`data.max_terms=2`, `data.arithmetic_ops=+`),
and held-out accuracy is greedy over 512 fixed held-out two-term sums. On the default +/- task the
same recipe stalls at about +17 points: GRPO sharpens addition, but subtraction, which the model
barely gets right when sampling, does not move. Expect held-out accuracy to rise from ~30% to
~60% within 200 steps (a few minutes on an idle 2-core CPU; numbers in BENCHMARKS.md).
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
    c.data.max_terms = 2  # the RL task: two-term sums (the held-out set follows it)
    c.data.arithmetic_ops = ("+",)
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

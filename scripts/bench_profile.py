"""Where the time goes, by XLA op: device-kernel totals of the train step and of batched generation.

    python scripts/bench.py profile --config=configs/small.py [--what=train,generate]   # one GPU, ~2 min
    python scripts/bench.py profile --config=configs/tiny.py --quick                   # CPU check

For each part: wall vs device-busy time per run (a large gap is launch overhead or host work),
kernel launches per run, and the ops that take the most device time (`dsjax.profiling`).
  train     the library's jitted train step (timing.train_runner), one random batch
  generate  inference.engine.generate_tokens on float32 master weights, --gen_batch prompts of
            --prompt tokens, --new_tokens each (bench_hf's generation shapes); per decode step
            figures are the run's divided by new_tokens
Writes bench_profile.json under $OUT (or --out); --trace_dir keeps the raw traces for TensorBoard
or Perfetto.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py preset", lock_config=True)
_WHAT = flags.DEFINE_list("what", ["train", "generate"], "parts to profile: train, generate")
_REPEAT = flags.DEFINE_integer("repeat", 3, "traced runs per part")
_TOP = flags.DEFINE_integer("top", 30, "ops listed per part")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 32, "generation batch")
_PROMPT = flags.DEFINE_integer("prompt", 512, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 128, "generated tokens per row")
_QUICK = flags.DEFINE_bool("quick", False, "tiny shapes (CPU check)")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "keep the traces here (one subdirectory per part)")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for bench_profile.json")


def generate_runner(config, batch: int, prompt: int, new_tokens: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from dsjax.config import replace
    from dsjax.inference import engine
    from dsjax.model import Transformer

    c = replace(config.model, **{"mtp.num_nextn_predict_layers": 0})
    variables = jax.jit(lambda k: nn.unbox(Transformer(c).init(k, jnp.zeros((1, 8), jnp.int32))))(
        jax.random.PRNGKey(0))
    r = np.random.RandomState(0)
    prompts = jnp.asarray(r.randint(0, c.vocab_size, (batch, prompt)), jnp.int32)
    lengths = jnp.full((batch,), prompt, jnp.int32)
    return lambda: engine.generate_tokens(c, variables, prompts, lengths, max_new_tokens=new_tokens,
                                          rng=jax.random.PRNGKey(0)).tokens


def main(argv):
    del argv
    from dsjax import profiling
    from dsjax.config import from_config_dict, replace
    from dsjax.timing import train_runner

    config = from_config_dict(_CONFIG.value)
    gen = (_GEN_BATCH.value, _PROMPT.value, _NEW.value)
    if _QUICK.value:
        from dsjax import sharding as shd
        batch_shards = shd.num_batch_shards(shd.make_mesh(config.mesh))  # two sequences per batch shard
        config = replace(config, **{"train.batch_size": 2 * batch_shards, "data.seq_len": 64})
        gen = (2, 16, 8)
    result = {"command": " ".join(sys.argv)}
    for part in _WHAT.value:
        if part == "train":
            run, _ = train_runner(config)
        elif part == "generate":
            run = generate_runner(config, *gen)
        else:
            raise app.UsageError(f"--what: unknown part {part!r} (train, generate)")
        trace_dir = os.path.join(_TRACE_DIR.value, part) if _TRACE_DIR.value else None
        p = profiling.profile(run, repeat=_REPEAT.value, trace_dir=trace_dir)
        print(f"\n== {part}" + (f" (per run; {gen[2]} decode steps per run)" if part == "generate" else ""))
        print(p.table(_TOP.value), flush=True)
        result[part] = p.as_dict(_TOP.value)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "bench_profile.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)

"""Convert between Hugging Face checkpoints and dsjax run directories (orbax).

    python scripts/convert_hf.py --hf=/path/to/DeepSeek-V3 --out=/tmp/v3-dsjax [--dtype=bfloat16]
    python scripts/convert_hf.py --workdir=/tmp/dsjax-tiny --out=/tmp/tiny-hf [--fp8]

HF -> dsjax writes a run directory (config.json + checkpoints/0 holding a TrainState with fresh
optimizer moments) that scripts/train.py fine-tunes from (`--workdir=OUT`), and that
scripts/generate.py and scripts/grpo.py load. dsjax -> HF writes config.json and safetensors in
the official layout (optionally FP8 with 128×128 weight_scale_inv) that transformers loads.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HF = flags.DEFINE_string("hf", None, "HF directory to import")
_WORKDIR = flags.DEFINE_string("workdir", None, "dsjax run directory to export")
_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
_FP8 = flags.DEFINE_bool("fp8", False, "export FP8 E4M3 weights with 128x128 weight_scale_inv")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to export (default: latest)")


def hf_to_dsjax(hf_dir: str, out: str, dtype: str) -> None:
    import jax.numpy as jnp

    from dsjax import checkpoint as ckpt_lib, hf
    from dsjax import sharding as shd
    from dsjax.config import Config, to_dict, validate
    from dsjax.train import state as state_lib
    from dsjax.train.optimizer import make_optimizer

    model_config, variables = hf.load_pretrained(hf_dir, jnp.dtype(dtype))
    config = validate(Config(model=model_config))
    mesh = shd.make_mesh(config.mesh)
    optimizer = make_optimizer(config.train)
    params = variables["params"]
    router = {"router": variables["router"]} if "router" in variables else {}
    import jax

    with jax.set_mesh(mesh):
        zero = jnp.zeros((), jnp.int32)
        state = state_lib.TrainState(zero, params, optimizer.init(params), router, jax.random.PRNGKey(0), zero, zero)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(to_dict(config), f, indent=2)
    with ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), keep=1, async_save=False) as checkpointer:
        checkpointer.save(0, state, {"step": 0, "source": os.path.abspath(hf_dir)}, force=True)


def dsjax_to_hf(workdir: str, out: str, fp8: bool, step, dtype: str) -> None:
    from dsjax import hf
    from dsjax.train.state import load_workdir

    config, variables, _ = load_workdir(workdir, step=step)
    hf.save_pretrained(out, config.model, variables, fp8=fp8, dtype=dtype)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if bool(_HF.value) == bool(_WORKDIR.value):
        raise app.UsageError("give exactly one of --hf (import) or --workdir (export)")
    if _HF.value:
        hf_to_dsjax(_HF.value, _OUT.value, _DTYPE.value)
    else:
        dsjax_to_hf(_WORKDIR.value, _OUT.value, _FP8.value, _STEP.value, _DTYPE.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

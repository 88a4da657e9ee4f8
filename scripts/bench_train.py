"""Train-step benchmark: tokens/s and MFU of a config's training step, and where its time goes.

    python scripts/bench.py train --config=configs/small.py [--steps=10] [--variants=capacity,dense]
    python scripts/bench.py train --config=configs/small.py --variants=dropless/minimal/cudnn/block --nobreakdown

The step is the library's jitted train step (dsjax.train.step) on one device. The breakdown times
forward+backward of each block kind at the step's shapes — MLA attention layer, dense FFN, MoE
FFN, output head + loss — times its count, next to the whole step; `--variants` re-times the whole
step with other MoE dispatch, remat, attention and FP8 settings (DISPATCH/REMAT[/ATTENTION[/FP8]]),
in the same process: the second command is issue 4's fp8=block against none.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "preset", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_VARIANTS = flags.DEFINE_list("variants", [], "extra DISPATCH/REMAT[/ATTENTION[/FP8]] settings to time the whole "
                              "step with, e.g. capacity/minimal/cudnn or dropless/minimal/cudnn/block")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "also time each block kind alone")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for bench_train.json")


def breakdown(config):
    """fwd+bwd seconds of one block of each kind at the step's shapes."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from dsjax.model.layers import RMSNorm, SwiGLU, Dense
    from dsjax.model.mla import MLA
    from dsjax.model.moe import MoE
    from dsjax.train.loss import token_ce
    from dsjax.timing import seconds_per_call

    c = config.model
    b, t, d = config.train.batch_size, config.data.seq_len, c.hidden_size
    x = jax.random.normal(jax.random.key(0), (b, t, d), jnp.bfloat16 if c.dtype == "bfloat16" else jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    targets = jax.random.randint(jax.random.key(1), (b, t), 0, c.vocab_size)

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return MLA(c)(RMSNorm(d, c)(x), pos, seg)[0]

    class Ffn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return SwiGLU(c.intermediate_size, c)(RMSNorm(d, c)(x))

    class Moe(nn.Module):
        @nn.compact
        def __call__(self, x):
            return MoE(c)(RMSNorm(d, c)(x), seg)[0]

    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            logits = Dense((d,), (c.vocab_size,), ("embed", "vocab"), c, island=True, out_dtype="float32")(RMSNorm(d, c)(x))
            return token_ce(logits, targets).mean()

    out = {}
    for name, module, count in (("attention (MLA layer)", Attn(), c.num_hidden_layers),
                                ("dense FFN", Ffn(), c.num_dense_layers),
                                ("MoE FFN", Moe(), c.num_moe_layers), ("head + loss", Head(), 1)):
        if count == 0:
            continue
        variables = nn.unbox(module.init(jax.random.key(0), x))
        params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

        def loss(p, x, module=module, rest=rest):
            return module.apply({"params": p, **rest}, x).astype(jnp.float32).sum()

        f = jax.jit(jax.grad(loss, argnums=(0, 1)))
        try:
            out[name] = {"seconds_each": seconds_per_call(f, params, x), "count": count}
        except Exception as e:  # recorded, not fatal
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "count": count}
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    from dsjax.config import from_config_dict, replace
    from dsjax.train import flops
    from dsjax.timing import step_seconds

    config = from_config_dict(_CONFIG.value, jax.device_count())
    c = config.model
    b, t = config.train.batch_size, config.data.seq_len
    use_mtp = c.mtp.num_nextn_predict_layers > 0 and config.train.mtp_weight > 0
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "batch": b, "seq_len": t,
              "active_params": flops.active_params(c, use_mtp), "steps": {}}
    base = f"{c.moe.dispatch}/{c.remat}/{c.attention}/{c.fp8}"
    variants = [base] + [v for v in _VARIANTS.value if v != base]
    for dispatch in variants:
        parts = dispatch.split("/")
        kind, remat = parts[:2]
        attention = parts[2] if len(parts) > 2 else c.attention
        fp8 = parts[3] if len(parts) > 3 else c.fp8
        cfg = replace(config, **{"model.moe.dispatch": kind, "model.remat": remat, "model.attention": attention,
                                 "model.fp8": fp8})
        try:
            seconds, compile_s, metrics = step_seconds(cfg, _STEPS.value)
            loss = metrics["loss"]
        except Exception as e:  # a variant that does not fit or compile is recorded, not fatal
            result["steps"][dispatch] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"dispatch={dispatch}: FAILED {result['steps'][dispatch]['error']}", flush=True)
            continue
        result["steps"][dispatch] = {
            "step_seconds": seconds, "compile_seconds": compile_s, "loss": loss, "tokens_per_s": b * t / seconds,
            "mfu": flops.mfu(c, b, t, use_mtp, seconds, config.train.peak_tflops, 1)}
        print(f"dispatch={dispatch}: {seconds * 1e3:.1f} ms/step, {b * t / seconds:,.0f} tokens/s, "
              f"MFU {result['steps'][dispatch]['mfu']:.1%} (compile {compile_s:.0f}s)", flush=True)
    result["breakdown"] = breakdown(config) if _BREAKDOWN.value else {}  # blocks as configured, no remat
    for name, row in result["breakdown"].items():
        if "error" in row:
            print(f"  {name:24s} FAILED {row['error']}", flush=True)
        else:
            print(f"  {name:24s} {row['seconds_each'] * 1e3:8.2f} ms x {row['count']}", flush=True)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "bench_train.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)

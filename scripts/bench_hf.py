"""Side by side with transformers' DeepseekV3ForCausalLM (PyTorch) on the same configuration.

    python scripts/bench.py hf --config=configs/small.py [--config.model.*=...]   # one GPU, one run
    python scripts/bench.py hf --config=configs/tiny.py --quick                   # CPU check, ~2 minutes

The peer is what users would otherwise pick (../shared/GPU.md): transformers with sdpa attention,
bf16 weights and fused AdamW. Both sides get the dsjax config (transformers through
`dsjax.hf.config_to_hf`), random weights and the same shapes, and are timed on
  * a training step: forward + backward + AdamW on a [batch, seq_len] batch of random tokens
    (dsjax: the library's jitted step, fp32 master weights, bf16 compute as configured; transformers:
    bf16 weights, `torch.optim.AdamW(fused=True)` on GPU);
  * batched greedy generation: `--gen_batch` prompts of `--prompt` tokens, `--new_tokens` new tokens
    each, no early stop (transformers: `generate(min_new_tokens=max_new_tokens)`; dsjax:
    `inference.engine.generate_tokens` without an EOS id), timed on a second call after a warm-up.
Each side runs in its own subprocess, one after the other (JAX preallocates GPU memory; torch has its
own allocator), and the parent prints both with the ratios and writes bench_hf.json under $OUT
(when set) or --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py preset", lock_config=True)
_SIDE = flags.DEFINE_enum("side", "both", ["both", "torch", "dsjax"], "internal: which side this process times")
_RESULT = flags.DEFINE_string("result", None, "internal: where a side writes its JSON")
_STEPS = flags.DEFINE_integer("steps", 10, "timed training steps")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 32, "generation batch")
_PROMPT = flags.DEFINE_integer("prompt", 512, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 128, "generated tokens per row")
_QUICK = flags.DEFINE_bool("quick", False, "tiny shapes (CPU check): 2 steps, batch 2 x 64, generation 2 x 16 + 8")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for bench_hf.json")


def shapes(config):
    if _QUICK.value:
        return dict(batch=2, seq_len=64, steps=2, gen_batch=2, prompt=16, new_tokens=8)
    return dict(batch=config.train.batch_size, seq_len=config.data.seq_len, steps=_STEPS.value,
                gen_batch=_GEN_BATCH.value, prompt=_PROMPT.value, new_tokens=_NEW.value)


def torch_side(config, s) -> dict:
    import numpy as np
    import torch
    import transformers
    from dsjax.hf import config_to_hf

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    hf = config_to_hf(config.model, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    hf["num_nextn_predict_layers"] = 0  # transformers has no MTP module
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device (a 4.3B-parameter CPU init takes minutes)
        model = transformers.DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    r = np.random.RandomState(0)
    ids = torch.as_tensor(r.randint(0, config.model.vocab_size, (s["batch"], s["seq_len"])), device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / s["steps"]
    out = {"train_step_s": step_s, "train_tokens_per_s": s["batch"] * s["seq_len"] / step_s,
           "loss": float(loss.detach()), "transformers": transformers.__version__, "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    model.eval()
    prompts = torch.as_tensor(r.randint(0, config.model.vocab_size, (s["gen_batch"], s["prompt"])), device=device)
    kw = dict(do_sample=False, max_new_tokens=s["new_tokens"], min_new_tokens=s["new_tokens"], pad_token_id=0,
              attention_mask=torch.ones_like(prompts))
    with torch.no_grad():
        model.generate(prompts, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        sync()
        t0 = time.perf_counter()
        generated = model.generate(prompts, **kw)
        sync()
    seconds = time.perf_counter() - t0
    assert generated.shape[1] == s["prompt"] + s["new_tokens"], generated.shape
    out.update(generate_s=seconds, generate_tokens_per_s=s["gen_batch"] * s["new_tokens"] / seconds)
    return out


def dsjax_side(config, s) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dsjax.config import replace
    from dsjax.inference import engine
    from dsjax.train import flops

    from dsjax.timing import step_seconds

    config = replace(config, **{"train.batch_size": s["batch"], "data.seq_len": s["seq_len"]})
    step_s, compile_s, metrics = step_seconds(config, s["steps"])
    loss = metrics["loss"]
    c = config.model
    use_mtp = c.mtp.num_nextn_predict_layers > 0 and config.train.mtp_weight > 0
    out = {"train_step_s": step_s, "train_tokens_per_s": s["batch"] * s["seq_len"] / step_s, "loss": loss,
           "compile_s": compile_s, "jax": jax.__version__, "device": jax.devices()[0].device_kind,
           "mfu": flops.mfu(c, s["batch"], s["seq_len"], use_mtp, step_s, config.train.peak_tflops, 1)}
    from flax import linen as nn
    from dsjax.model import Transformer
    gen_config = replace(c, **{"mtp.num_nextn_predict_layers": 0})
    variables = jax.jit(lambda k: nn.unbox(Transformer(gen_config).init(k, jnp.zeros((1, 8), jnp.int32))))(
        jax.random.PRNGKey(0))
    r = np.random.RandomState(0)
    prompts = r.randint(0, c.vocab_size, (s["gen_batch"], s["prompt"])).astype(np.int32)
    lengths = np.full((s["gen_batch"],), s["prompt"], np.int32)

    def generate():
        result = engine.generate_tokens(gen_config, variables, prompts, lengths, max_new_tokens=s["new_tokens"],
                                        rng=jax.random.PRNGKey(0))
        return jax.block_until_ready(result.tokens)

    generate()
    t0 = time.perf_counter()
    tokens = generate()
    seconds = time.perf_counter() - t0
    assert tokens.shape[1] == s["new_tokens"], tokens.shape
    out.update(generate_s=seconds, generate_tokens_per_s=s["gen_batch"] * s["new_tokens"] / seconds)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from dsjax.config import from_config_dict

    if _SIDE.value != "both":
        config = from_config_dict(_CONFIG.value)
        s = shapes(config)
        result = torch_side(config, s) if _SIDE.value == "torch" else dsjax_side(config, s)
        with open(_RESULT.value, "w") as f:
            json.dump(result, f)
        return
    config = from_config_dict(_CONFIG.value)  # validates before either side starts
    s = shapes(config)
    result = {"date": time.strftime("%Y-%m-%d"), "shapes": s, "command": " ".join(sys.argv)}
    for side in ("torch", "dsjax"):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--result={f.name}"] + \
                [a for a in sys.argv[1:] if not a.startswith(("--side", "--result"))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                result[side] = {"error": proc.stderr[-1500:]}
                print(f"{side}: FAILED\n{proc.stderr[-1500:]}", flush=True)
                continue
            result[side] = json.load(open(f.name))
        r = result[side]
        print(f"{side:12s} train {r['train_step_s'] * 1e3:8.1f} ms/step {r['train_tokens_per_s']:10,.0f} tokens/s   "
              f"generate {r['generate_tokens_per_s']:10,.0f} tokens/s", flush=True)
    if "error" not in result["torch"] and "error" not in result["dsjax"]:
        t, d = result["torch"], result["dsjax"]
        result["train_ratio"] = d["train_tokens_per_s"] / t["train_tokens_per_s"]
        result["generate_ratio"] = d["generate_tokens_per_s"] / t["generate_tokens_per_s"]
        print(f"dsjax / transformers: training {result['train_ratio']:.2f}x, generation {result['generate_ratio']:.2f}x"
              f" (dsjax MFU {d['mfu']:.1%})", flush=True)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "bench_hf.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)

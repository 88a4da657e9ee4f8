"""Generate text from a dsjax run directory or a Hugging Face checkpoint, streaming as it decodes.

    python scripts/generate.py --workdir=/tmp/dsjax-tiny --prompt="12+34=" [--max_new_tokens=64]
    python scripts/generate.py --hf=/path/to/DeepSeek-V2-Lite --prompt="The capital of France is" \
        [--temperature=0.7 --top_p=0.9] [--speculative] [--dtype=bfloat16]

--workdir is what scripts/train.py writes (config.json + orbax checkpoints/; the latest step, or
--step); --hf is a folder of config.json + safetensors. The tokenizer is the run's data.tokenizer,
or the folder's tokenizer.json, or --tokenizer ("byte" or a tokenizer.json path). Each prompt
is encoded as [bos] + text and decoded on device by the library's engine in chunks of --chunk
steps (one jitted loop per chunk: the same loop `inference.generate` runs, so streaming never
changes what is generated); the text printed so far is refreshed after each chunk.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", None, "a dsjax run directory (config.json + checkpoints/)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_HF = flags.DEFINE_string("hf", None, "a Hugging Face checkpoint folder (config.json + *.safetensors)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and compute dtype for --hf")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'byte' or a tokenizer.json path (default: from the checkpoint)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "prompt text (repeat for several)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate per prompt at most")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "draft with the MTP modules, verify with the model")
_CHUNK = flags.DEFINE_integer("chunk", 8, "decode steps (verify cycles when speculative) between screen updates")
_BOS = flags.DEFINE_bool("bos", True, "prepend the tokenizer's BOS id")

PROMPT_BUCKET = 64  # prompt columns are rounded up to a multiple of this: prompts share compiles


def load(mesh):
    """(ModelConfig, variables, tokenizer) from --workdir or --hf."""
    import jax.numpy as jnp
    from dsjax.data.tokenizer import make_tokenizer

    if bool(_WORKDIR.value) == bool(_HF.value):
        raise app.UsageError("pass exactly one of --workdir (a dsjax run) or --hf (a Hugging Face folder)")
    if _WORKDIR.value:
        from dsjax.train.state import load_workdir

        config, variables, step = load_workdir(_WORKDIR.value, mesh=mesh, step=_STEP.value)
        print(f"[{_WORKDIR.value}: step {step}]", file=sys.stderr)
        model, tokenizer_spec = config.model, config.data.tokenizer
    else:
        from dsjax import hf

        model, variables = hf.load_pretrained(_HF.value, dtype=jnp.dtype(_DTYPE.value), mesh=mesh)
        tokenizer_spec = _HF.value if os.path.exists(os.path.join(_HF.value, "tokenizer.json")) else "byte"
    tokenizer = make_tokenizer(_TOKENIZER.value or tokenizer_spec)
    if tokenizer.vocab_size > model.vocab_size:
        raise app.UsageError(f"tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{model.vocab_size}")
    return model, variables, tokenizer


def stream(model, variables, tokenizer, ids: list[int], rng) -> tuple[list[int], dict]:
    """Decodes one prompt, printing text as each chunk of steps lands; returns the new ids and stats."""
    import jax
    import numpy as np
    from dsjax.inference import engine, speculative

    context = model.max_position_embeddings
    if len(ids) >= context:
        raise app.UsageError(f"the prompt is {len(ids)} tokens but the model's context (max_position_embeddings) is "
                             f"{context}; shorten it")
    depth = model.mtp.num_nextn_predict_layers if _SPECULATIVE.value else 0
    if _SPECULATIVE.value and not depth:
        raise app.UsageError("--speculative drafts with the MTP modules, and this model has none")
    n = min(_MAX_NEW.value, context - len(ids) - depth)
    if n < 1:
        raise app.UsageError(f"the prompt is {len(ids)} tokens and leaves no room to generate in the model's context "
                             f"(max_position_embeddings={context})")
    if n < _MAX_NEW.value:
        print(f"[max_new_tokens capped at {n}: the context is {context} tokens]", file=sys.stderr)
    p = min(-(-len(ids) // PROMPT_BUCKET) * PROMPT_BUCKET, context - n - depth)
    tokens = np.zeros((1, p), np.int32)
    tokens[0, p - len(ids):] = ids
    lengths = np.asarray([len(ids)], np.int32)
    lib = speculative if depth else engine
    static = dict(max_new_tokens=n, sampler=engine.Sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value))
    start_static = dict(static, depth=depth) if depth else static
    start = jax.jit(lib.start, static_argnums=0, static_argnames=tuple(start_static))
    advance = jax.jit(lib.advance, static_argnums=0, static_argnames=tuple(static))
    eos = model.eos_token_id if model.eos_token_id is not None else tokenizer.eos_id
    eos_arr, _ = engine.special_ids(eos, None)

    t0 = time.perf_counter()
    loop = start(model, variables, tokens, lengths, rng, eos_arr, **start_static)
    shown, first_token_s = "", None
    while True:
        count = int(loop.count_B[0])
        first_token_s = first_token_s or time.perf_counter() - t0
        out = np.asarray(loop.tokens_BX[0, :count]).tolist()
        text = tokenizer.decode([t for t in out if t != eos])
        if text.endswith("\ufffd") and not bool(loop.done_B[0]):
            text = text.rstrip("\ufffd")  # a multi-byte character split across chunks: wait for the rest
        if text.startswith(shown):
            sys.stdout.write(text[len(shown):])
        else:  # a tokenizer that re-merges across the boundary: reprint the line
            sys.stdout.write("\r" + text)
        sys.stdout.flush()
        shown = text
        if bool(loop.done_B[0]):
            break
        loop = advance(model, variables, loop, rng, eos_arr, loop.step + _CHUNK.value, **static)
    seconds = time.perf_counter() - t0
    stats = {"tokens": count, "seconds": seconds, "first_token_s": first_token_s}
    if depth:
        stats["acceptance"] = float(loop.accepted_B.sum()) / max(float(loop.drafted_B.sum()), 1.0)
    return out, stats


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax
    from dsjax import sharding as shd
    from dsjax.config import MeshConfig

    mesh = shd.make_mesh(MeshConfig(data=1, expert=1, tensor=1))  # one device; batch 1
    prompts = _PROMPT.value or [sys.stdin.read()]
    with jax.set_mesh(mesh):
        model, variables, tokenizer = load(mesh)
        for i, prompt in enumerate(prompts):
            head = [tokenizer.bos_id] if _BOS.value and tokenizer.bos_id is not None else []
            ids = head + tokenizer.encode(prompt)
            sys.stdout.write(prompt)
            out, stats = stream(model, variables, tokenizer, ids, jax.random.PRNGKey(_SEED.value + i))
            extra = f", {stats['acceptance']:.0%} of MTP drafts accepted" if "acceptance" in stats else ""
            print(f"\n[{stats['tokens']} tokens in {stats['seconds']:.2f} s (first after "
                  f"{stats['first_token_s']:.2f} s, compile included){extra}]", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)

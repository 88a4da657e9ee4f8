"""Decode benchmark: absorbed latent cache vs an expanded per-head K/V cache, and MTP speculation.

    python scripts/bench_decode.py --config=configs/small.py            # one H200, ~5-8 minutes
    python scripts/bench_decode.py --config=configs/tiny.py --quick     # CPU smoke test, ~1 minute

Part 1 — one decode step (batch B, context S: the cache holds S slots, all attended) for
  * absorbed: the library's decode (dsjax.inference.engine.decode: MLA over the latent cache,
    kv_lora_rank + qk_rope_head_dim values per token per layer, W_UK/W_UV absorbed);
  * expanded: BASELINE ONLY, written here — the same weights with a per-head K/V cache
    (H·(qk_nope + qk_rope + v_head) values per token per layer, what MHA-style ports keep),
    K/V expanded through kv_b once per new token and written in place into the cache carried
    through the layer scan (the efficient way to write it); it is checked against the
    absorbed path's logits first.
  Reported: tokens/s, the compiled step's cost_analysis()['bytes accessed'] per token beside the
  theoretical weights + cache bytes per token (weights: every non-routed parameter read once per
  step plus the routed experts a batch of B tokens touches under uniform routing; cache: all S
  slots read once), the cache read rate (extra cache bytes / extra step time between the two
  contexts of a batch size: how close each path's attention gets to HBM bandwidth), and "does
  not fit" when the cache (or the compiled step's memory analysis) exceeds device memory.
  Caveat: XLA's cost analysis counts a while-loop body once, and the layers are scanned, so
  'bytes accessed' is not a per-step total; the read rate is the trustworthy comparison.
Part 2 — greedy generation, plain vs MTP speculative (one MTP module added when the config has
  none), tokens/s and acceptance: with random MTP weights (acceptance ~0: the cost of drafting),
  with oracle MTP weights (dsjax.inference.speculative.oracle_draft_variables: 100% acceptance,
  every matmul still runs: the ceiling), and with a trained run's weights when --workdir is set.
  "same" compares the speculative and plain token streams: in bf16 on random weights, whose top
  logits nearly tie everywhere, the verify forward's [B, D+1] shapes round differently from the
  plain [B, 1] step and the streams may part (exactness is tested in float32).

Compiles run in parallel threads (XLA releases the GIL); everything else is sequential. Writes
bench_decode.json to $OUT (or --out) and prints a table.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import time
from typing import NamedTuple

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # plan against (nearly) all of HBM
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py preset", lock_config=True)
_QUICK = flags.DEFINE_bool("quick", False, "tiny shapes for a CPU smoke test")
_BATCHES = flags.DEFINE_list("batches", ["1", "32", "128"], "decode batch sizes")
_CONTEXTS = flags.DEFINE_list("contexts", ["4096", "32768"], "cache lengths (slots attended per step)")
_STEPS = flags.DEFINE_integer("steps", 20, "timed decode steps per case")
_SPEC_BATCHES = flags.DEFINE_list("spec_batches", ["1", "32"], "batch sizes of the speculative comparison")
_SPEC_PROMPT = flags.DEFINE_integer("spec_prompt", 128, "prompt tokens in the speculative comparison")
_SPEC_NEW = flags.DEFINE_integer("spec_new_tokens", 128, "generated tokens in the speculative comparison")
_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run (scripts/train.py) for a real acceptance rate")
_MEMORY_GB = flags.DEFINE_float("memory_limit_gb", None, "device memory to plan against (default: the device's)")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT"), "directory for bench_decode.json")

QUICK = dict(batches=[1, 4], contexts=[128, 512], steps=3, spec_batches=[1, 2], spec_prompt=16, spec_new_tokens=16,
             memory_limit_gb=0.004)
CHECK_TOL = 1e-3  # expanded vs absorbed logits after one decode step, both in float32


# ------------------------------------------------------------------------- expanded-cache baseline


class ExpandedCache(NamedTuple):
    """BASELINE: per-head keys [L, B, S, H, K+R] (rope key repeated per head) and values [L, B, S, H, O]."""

    k: object
    v: object


def expanded_shapes(config, batch: int, length: int):
    import jax
    import jax.numpy as jnp

    m, dtype = config.mla, jnp.dtype(config.dtype)
    h = m.num_attention_heads

    def stack(n):
        if not n:
            return None
        k_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        return ExpandedCache(jax.ShapeDtypeStruct((n, batch, length, h, k_dim), dtype),
                             jax.ShapeDtypeStruct((n, batch, length, h, m.v_head_dim), dtype))

    return {"dense_stack": stack(config.num_dense_layers), "moe_stack": stack(config.num_moe_layers)}


def _expanded_attention(config, p, x_BTD, positions_BT, kv_BS, k_cache, v_cache, layer, write_index):
    """BASELINE MLA with expanded K/V: new k_nope/v = c_KV·W_UK / c_KV·W_UV written per head."""
    import jax
    import jax.numpy as jnp
    from dsjax.model import rope
    from dsjax.model.layers import RMSNorm
    from dsjax.model.mla import attention_mask

    c, m = config, config.mla
    dtype = jnp.dtype(c.dtype)
    k, r, lat = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    w = lambda name: p[name]["kernel"].astype(dtype)  # noqa: E731
    norm = lambda name, v: RMSNorm(v.shape[-1], c).apply({"params": p[name]}, v)  # noqa: E731
    if m.q_lora_rank is None:
        q_BTHX = jnp.einsum("BTD,DHX->BTHX", x_BTD, w("q"))
    else:
        q_BTHX = jnp.einsum("BTQ,QHX->BTHX", norm("q_a_norm", x_BTD @ w("q_a")), w("q_b"))
    kv_BTX = x_BTD @ w("kv_a")
    c_kv_BTC = norm("kv_a_norm", kv_BTX[..., :lat])
    cos, sin = rope.cos_sin(positions_BT, c)
    q_BTHX = jnp.concatenate([q_BTHX[..., :k], rope.apply_rope(q_BTHX[..., k:], cos, sin, c.rope.interleave)], -1)
    k_rope_BTR = rope.apply_rope(kv_BTX[..., lat:], cos, sin, c.rope.interleave)
    kv_BTHX = jnp.einsum("BTC,CHX->BTHX", c_kv_BTC, p["kv_b"].astype(dtype))
    h = kv_BTHX.shape[2]
    k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None], k_rope_BTR.shape[:2] + (h, r))
    k_new_BTHX = jnp.concatenate([kv_BTHX[..., :k], k_rope_BTHR], -1)
    at = (layer, 0, write_index, 0, 0)  # in place: the caches are the layer scan's carry
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_new_BTHX[None].astype(k_cache.dtype), at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, kv_BTHX[None, ..., k:].astype(v_cache.dtype), at)
    scores_BHTS = jnp.einsum("BTHX,BSHX->BHTS", q_BTHX, k_cache[layer], preferred_element_type=jnp.float32)
    mask_B1TS = attention_mask(positions_BT, None, kv_BS)[:, None]
    scores_BHTS = jnp.where(mask_B1TS, scores_BHTS * rope.softmax_scale(c), -1e30)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)
    out_BTHO = jnp.einsum("BHTS,BSHO->BTHO", probs_BHTS, v_cache[layer])
    return jnp.einsum("BTHO,HOD->BTD", out_BTHO, w("o")), k_cache, v_cache


def expanded_decode(config, variables, caches: dict, kv_BS, write_index, tokens_BT, positions_BT):
    """BASELINE decode step over expanded caches: (logits [B, T, V], caches)."""
    import jax
    import jax.numpy as jnp
    from dsjax.model.layers import RMSNorm, SwiGLU
    from dsjax.model.moe import MoE

    c = config
    params, router = variables["params"], variables.get("router", {})
    dtype = jnp.dtype(c.dtype)
    x_BTD = jnp.take(params["embed"]["embedding"], tokens_BT, axis=0).astype(dtype)
    segments_BT = jnp.ones_like(tokens_BT)
    new = {}
    for stack, moe in (("dense_stack", False), ("moe_stack", True)):
        if caches.get(stack) is None:
            continue
        layers = params[stack]["scan"]["layer"]
        layer_router = router[stack]["scan"]["layer"] if moe else None

        def body(carry, xs, moe=moe):
            x, kc, vc = carry
            p, rb, layer = xs
            h = RMSNorm(c.hidden_size, c).apply({"params": p["attn_norm"]}, x)
            attn, kc, vc = _expanded_attention(c, p["attn"], h, positions_BT, kv_BS, kc, vc, layer, write_index)
            x = x + attn
            h = RMSNorm(c.hidden_size, c).apply({"params": p["mlp_norm"]}, x)
            if moe:
                ffn, _ = MoE(c).apply({"params": p["moe"], "router": rb["moe"]}, h, segments_BT)
            else:
                ffn = SwiGLU(c.intermediate_size, c).apply({"params": p["mlp"]}, h)
            return (x + ffn, kc, vc), None

        n = jax.tree_util.tree_leaves(layers)[0].shape[0]
        (x_BTD, kc, vc), _ = jax.lax.scan(body, (x_BTD, caches[stack].k, caches[stack].v),
                                          (layers, layer_router, jnp.arange(n)))
        new[stack] = ExpandedCache(kc, vc)
    h_BTD = RMSNorm(c.hidden_size, c).apply({"params": params["final_norm"]}, x_BTD)
    logits = jnp.einsum("BTD,DV->BTV", h_BTD, params["head"]["kernel"].astype(dtype),
                        preferred_element_type=jnp.float32)
    return logits, new


def expand_latent(config, variables, latent):
    """The expanded caches holding exactly what a latent cache implies (for the agreement check)."""
    import jax.numpy as jnp

    m, params = config.mla, variables["params"]
    out = {}
    for stack, cache in (("dense_stack", latent.dense), ("moe_stack", latent.moe)):
        if cache is None:
            continue
        kv_b = params[stack]["scan"]["layer"]["attn"]["kv_b"].astype(cache.c_kv_BSC.dtype)
        kv_LBSHX = jnp.einsum("LBSC,LCHX->LBSHX", cache.c_kv_BSC, kv_b)
        h = kv_LBSHX.shape[3]
        rope_LBSHR = jnp.broadcast_to(cache.k_rope_BSR[:, :, :, None],
                                      cache.k_rope_BSR.shape[:3] + (h, m.qk_rope_head_dim))
        out[stack] = ExpandedCache(jnp.concatenate([kv_LBSHX[..., :m.qk_nope_head_dim], rope_LBSHR], -1),
                                   kv_LBSHX[..., m.qk_nope_head_dim:])
    return out


# ------------------------------------------------------------------------------------ accounting


def size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def nbytes(tree) -> int:
    import jax
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def weight_bytes_per_step(config, params, batch: int) -> float:
    """Non-routed weights once (embedding: B rows, MTP modules excluded) + expected touched experts."""
    import jax

    total = routed = 0.0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", k)) for k in path]
        size = math.prod(x.shape) * x.dtype.itemsize
        if names[0].startswith("mtp_"):
            continue
        if names[0] == "embed":
            size = batch * x.shape[-1] * x.dtype.itemsize
        if "moe" in names and names[-1] in ("gate", "up", "down"):
            routed += size
            continue
        total += size
    moe = config.moe
    if moe.n_routed_experts:
        k, e = moe.num_experts_per_tok, moe.n_routed_experts
        touched = e * (1.0 - (1.0 - k / e) ** batch)
        total += routed * touched / e
    return total


def device_memory_bytes() -> float:
    import jax
    if _MEMORY_GB.value is not None:
        return _MEMORY_GB.value * 2 ** 30
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def compiled_bytes(compiled) -> tuple[float, float]:
    """(bytes accessed per call, peak device bytes) from the compiled step."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    peak = float("nan")
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return float(cost.get("bytes accessed", float("nan"))), peak


def parallel_compile(lowered: dict) -> dict:
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(lowered)))) as pool:
        futures = {key: pool.submit(low.compile) for key, low in lowered.items()}
        return {key: f.result() for key, f in futures.items()}


# ------------------------------------------------------------------------------------ part 1


def decode_cases(config, variables, batches, contexts, steps, limit):
    import jax
    import jax.numpy as jnp
    from dsjax.inference import cache as cache_lib, engine

    weights = nbytes(variables)
    def absorbed_step(v, state, t):
        out, state = engine.decode(config, v, state, t)
        return jnp.argmax(out.logits[:, -1], -1), state

    absorbed = jax.jit(absorbed_step, donate_argnums=1)

    def expanded_step(v, caches, kv_BS, w, t, pos):
        logits, caches = expanded_decode(config, v, caches, kv_BS, w, t, pos)
        return jnp.argmax(logits[:, -1], -1), caches

    expanded = jax.jit(expanded_step, donate_argnums=1)
    abstract_v = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    rows, lowered = [], {}
    for b in batches:
        for s in contexts:
            tok = jax.ShapeDtypeStruct((b, 1), jnp.int32)
            kv = jax.ShapeDtypeStruct((b, s), jnp.int32)
            scalar = jax.ShapeDtypeStruct((), jnp.int32)
            latent = jax.eval_shape(lambda: cache_lib.init_cache(config, b, s, mtp=False))
            state = engine.DecodeState(latent, kv, scalar, jax.ShapeDtypeStruct((b,), jnp.int32))
            expanded_cache = expanded_shapes(config, b, s)
            for path, cache_abs in (("absorbed", latent), ("expanded", expanded_cache)):
                row = dict(path=path, batch=b, context=s, cache_gb=nbytes(cache_abs) / 1e9,
                           cache_values_per_token_per_layer=nbytes(cache_abs) // (b * s * config.num_hidden_layers)
                           // jnp.dtype(config.dtype).itemsize)
                rows.append(row)
                if weights + nbytes(cache_abs) > limit:
                    row["status"] = f"does not fit: weights + cache {size(weights + nbytes(cache_abs))} > {size(limit)}"
                    continue
                if path == "absorbed":
                    lowered[(path, b, s)] = absorbed.lower(abstract_v, state, tok)
                else:
                    lowered[(path, b, s)] = expanded.lower(abstract_v, expanded_cache, kv, scalar, tok, tok)
    t0 = time.perf_counter()
    compiled = parallel_compile(lowered)
    print(f"compiled {len(compiled)} decode steps in {time.perf_counter() - t0:.0f} s", flush=True)

    for row in rows:
        key = (row["path"], row["batch"], row["context"])
        if key not in compiled:
            continue
        b, s = row["batch"], row["context"]
        accessed, peak = compiled_bytes(compiled[key])
        row["bytes_per_token_xla"] = accessed / b
        row["bytes_per_token_theory"] = (weight_bytes_per_step(config, variables["params"], b)
                                         + row["cache_gb"] * 1e9) / b
        if peak > limit:
            row["status"] = f"does not fit: the compiled step needs {size(peak)} > {size(limit)}"
            continue
        fill = s - steps - 3  # slots 0..fill-1 hold a context; the timed steps write after it
        kv_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        tokens = jnp.zeros((b, 1), jnp.int32)
        if row["path"] == "absorbed":
            cache = jax.jit(lambda: cache_lib.init_cache(config, b, s, mtp=False))()
            carry = engine.DecodeState(cache, kv_BS, jnp.int32(fill), jnp.full((b,), fill, jnp.int32))
            call = lambda carry, i: compiled[key](variables, carry, tokens)  # noqa: E731
        else:
            carry = jax.jit(lambda: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                           expanded_shapes(config, b, s)))()
            pos = jnp.full((b, 1), fill, jnp.int32)
            call = lambda carry, i: compiled[key](variables, carry, kv_BS, jnp.int32(fill + i), tokens,  # noqa: E731
                                                  pos + i)
        for i in range(3):
            _, carry = call(carry, i)
        jax.block_until_ready(carry)
        t0 = time.perf_counter()
        for i in range(steps):
            out, carry = call(carry, 3 + i)
        jax.block_until_ready((out, carry))
        seconds = (time.perf_counter() - t0) / steps
        row.update(status="ok", ms_per_step=seconds * 1e3, tokens_per_s=b / seconds)
        del carry
    for row in rows:  # cache read rate: extra cache bytes over extra step time between two contexts
        shorter = [r for r in rows if r["path"] == row["path"] and r["batch"] == row["batch"]
                   and r["context"] < row["context"] and "ms_per_step" in r]
        if shorter and "ms_per_step" in row:
            base = max(shorter, key=lambda r: r["context"])
            extra_s = (row["ms_per_step"] - base["ms_per_step"]) / 1e3
            row["cache_read_gb_per_s"] = (row["cache_gb"] - base["cache_gb"]) / extra_s if extra_s > 0 else float("inf")
    for row in rows:
        other = next((r for r in rows if r["path"] == "expanded" and r["batch"] == row["batch"]
                      and r["context"] == row["context"]), None)
        if row["path"] == "absorbed" and other is not None and "tokens_per_s" in row:
            row["speedup_vs_expanded"] = (row["tokens_per_s"] / other["tokens_per_s"]
                                          if "tokens_per_s" in other else "expanded does not fit")
    return rows


def check_baseline(config, variables):
    """The expanded baseline's logits equal the library's absorbed decode after a real prefill, in
    float32 at highest matmul precision (in bf16 the two orders of rounding flip MoE routing on
    random weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dsjax.config import replace
    from dsjax.inference import cache as cache_lib, engine

    config = replace(config, dtype="float32", param_dtype="float32")
    variables = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), variables)

    b, p = 2, 16
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, p), 0, config.vocab_size)
    lengths = jnp.asarray([p, p // 2], jnp.int32)
    nxt = jnp.asarray([[3], [5]], jnp.int32)

    @jax.jit
    def both(v):
        _, state = engine.prefill(config, v, tokens, lengths, cache_lib.init_cache(config, b, p + 1, mtp=False))
        expanded = expand_latent(config, v, state.cache)
        out, _ = engine.decode(config, v, state, nxt)
        kv = jax.lax.dynamic_update_slice(state.kv_positions_BS, state.next_position_B[:, None], (0, p))
        logits, _ = expanded_decode(config, v, expanded, kv, jnp.int32(p), nxt, state.next_position_B[:, None])
        return out.logits, logits

    with jax.default_matmul_precision("highest"):  # GPUs default f32 dots to TF32
        absorbed, expanded = both(variables)
    diff = float(np.abs(np.asarray(absorbed) - np.asarray(expanded)).max())
    tol = CHECK_TOL
    print(f"baseline check: max |expanded - absorbed| logit difference {diff:.2e} (tolerance {tol})", flush=True)
    if not diff <= tol:
        raise SystemExit("the expanded-cache baseline disagrees with the absorbed decode; benchmark aborted")
    return diff


# ------------------------------------------------------------------------------------ part 2


def speculative_cases(config, variables, batches, prompt, new_tokens, label):
    import jax
    import numpy as np
    from dsjax.inference import engine, speculative

    rows, lowered, inputs = [], {}, {}
    for b in batches:
        tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(b), (b, prompt), 0, min(config.vocab_size, 256)),
                            np.int32)
        lengths = np.full((b,), prompt, np.int32)
        eos, pad = engine.special_ids(None, None)
        rng = jax.random.PRNGKey(0)
        args = (config, variables, tokens, lengths, rng, eos, pad)
        lowered[("plain", b)] = engine._generate_jit.lower(*args, max_new_tokens=new_tokens, sampler=engine.Sampler(),
                                                           record_experts=False)
        lowered[("speculative", b)] = speculative._generate_jit.lower(*args, max_new_tokens=new_tokens,
                                                                      sampler=engine.Sampler(), depth=1)
        inputs[b] = args[1:]
    compiled = parallel_compile(lowered)
    weights = {"random MTP": variables, "oracle MTP": speculative.oracle_draft_variables(variables)}
    if label:
        weights = {label: variables}
    def timed(fn, args):
        jax.block_until_ready(fn(*args))  # warm (first call of a compiled executable)
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        return result, time.perf_counter() - t0

    for b in batches:
        for name, v in weights.items():
            args = (v,) + inputs[b][1:]
            plain, plain_s = timed(compiled[("plain", b)], args)
            spec, spec_s = timed(compiled[("speculative", b)], args)
            rows.append(dict(batch=b, prompt=prompt, new_tokens=new_tokens, weights=name,
                             plain_tokens_per_s=b * new_tokens / plain_s,
                             speculative_tokens_per_s=b * new_tokens / spec_s,
                             speedup=plain_s / spec_s, acceptance=engine.acceptance_rate(spec),
                             verify_cycles=int(spec.steps),
                             identical_to_plain=bool((np.asarray(spec.tokens) == np.asarray(plain.tokens)).all())))
    return rows


# ------------------------------------------------------------------------------------------ main


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from dsjax.config import from_config_dict, replace
    from dsjax.model import Transformer

    config = from_config_dict(_CONFIG.value).model
    opts = dict(batches=[int(x) for x in _BATCHES.value], contexts=[int(x) for x in _CONTEXTS.value],
                steps=_STEPS.value, spec_batches=[int(x) for x in _SPEC_BATCHES.value], spec_prompt=_SPEC_PROMPT.value,
                spec_new_tokens=_SPEC_NEW.value, memory_limit_gb=_MEMORY_GB.value)
    if _QUICK.value:
        opts.update({k: v for k, v in QUICK.items() if k != "memory_limit_gb" or _MEMORY_GB.value is None})
    limit = opts["memory_limit_gb"] * 2 ** 30 if opts["memory_limit_gb"] else device_memory_bytes()
    config = replace(config, param_dtype=config.dtype)  # inference weights in the compute dtype
    if config.mtp.num_nextn_predict_layers == 0:
        config = replace(config, **{"mtp.num_nextn_predict_layers": 1})  # for part 2; part 1 never runs it
    print(f"device: {jax.devices()[0].device_kind}; memory planned against: {size(limit)}; "
          f"dtype {config.dtype}", flush=True)
    init = jax.jit(lambda key: nn.unbox(Transformer(config).init(key, jnp.zeros((1, 8), jnp.int32))))
    variables = init(jax.random.PRNGKey(0))
    report = {"date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind,
              "config": dataclasses.asdict(config), "options": opts}
    report["baseline_check_max_abs_diff"] = check_baseline(config, variables)
    decode_vars = {**variables, "params": {k: v for k, v in variables["params"].items() if not k.startswith("mtp_")}}
    report["decode"] = decode_cases(config, decode_vars, opts["batches"], opts["contexts"], opts["steps"], limit)
    save(report)
    report["speculative"] = speculative_cases(config, variables, opts["spec_batches"], opts["spec_prompt"],
                                              opts["spec_new_tokens"], None)
    save(report)
    if _WORKDIR.value:
        from dsjax.train.state import load_workdir
        trained_config, trained, step = load_workdir(_WORKDIR.value)
        if trained_config.model.mtp.num_nextn_predict_layers == 0:
            raise SystemExit(f"{_WORKDIR.value}: the trained model has no MTP module to draft with")
        report["speculative"] += speculative_cases(trained_config.model, trained, opts["spec_batches"],
                                                   opts["spec_prompt"], opts["spec_new_tokens"],
                                                   f"trained ({_WORKDIR.value} step {step})")
    save(report)
    print_tables(report)


def save(report):
    """Writes what is measured so far (a run cut short still leaves its first part)."""
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "bench_decode.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)


def print_tables(report):
    nan = float("nan")
    print("\ndecode step (one new token per row; the cache holds `context` slots, all attended)")
    head = f"{'path':<9} {'batch':>5} {'context':>7} {'cache':>9} {'tok/s':>10} {'ms/step':>8} " \
           f"{'B/tok XLA':>11} {'B/tok theory':>12} {'cache GB/s':>10} {'speedup':>8}  status"
    print(head)
    for r in report["decode"]:
        speed = r.get("speedup_vs_expanded", "")
        speed = f"{speed:.2f}x" if isinstance(speed, float) else ("n/a" if speed else "")
        print(f"{r['path']:<9} {r['batch']:>5} {r['context']:>7} {size(r['cache_gb'] * 1e9):>9} "
              f"{r.get('tokens_per_s', nan):>10.1f} {r.get('ms_per_step', nan):>8.2f} "
              f"{r.get('bytes_per_token_xla', nan):>11.3e} {r.get('bytes_per_token_theory', nan):>12.3e} "
              f"{r.get('cache_read_gb_per_s', nan):>10.0f} {speed:>8}  {r['status']}")
    print("\ngreedy generation, plain vs MTP speculative (depth 1)")
    print(f"{'weights':<28} {'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'accept':>7} "
          f"{'cycles':>7} {'same':>5}")
    for r in report["speculative"]:
        print(f"{r['weights'][:28]:<28} {r['batch']:>5} {r['plain_tokens_per_s']:>12.1f} "
              f"{r['speculative_tokens_per_s']:>11.1f} {r['speedup']:>7.2f}x {r['acceptance']:>7.1%} "
              f"{r['verify_cycles']:>7} {str(r['identical_to_plain']):>5}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)

"""MoE benchmark (GPU): grouped-GEMM check, grouped GEMM and MoE-layer TFLOP/s, expert parallelism.

    python scripts/bench.py moe              # on the GPU machine, one run
    python scripts/bench.py moe --quick      # tiny shapes on CPU (xla paths, 4 fake devices): checks the script
    python scripts/bench.py moe --parts=gmm --xla_tokens=   # only issue 7's grouped-GEMM rows (~2 min less)

(a) check    grouped_gemm 'pallas_mgpu' forward, input grad and weight grad vs jax.lax.ragged_dot in
             float32 (uneven groups, empty groups, rows past the groups), beside XLA's bf16 error.
(b) speed    on DeepSeek-V3 expert shapes (hidden 7168, expert FFN 2048, 8 of 256 experts + 1
             shared), fwd+bwd, for each token count:
               gmm   one grouped GEMM [tokens·8, 7168] x [256, 7168, 2048] vs a dense bf16 GEMM of
                     the same FLOPs ([tokens·8, 7168] x [7168, 2048]);
               layer the MoE layer (router, routed experts, shared expert) vs a dense SwiGLU of width
                     9·2048 (the same GEMM FLOPs);
             for grouped_gemm 'xla' (only at --xla_tokens: XLA densifies ragged_dot, anchor J1) and
             'pallas_mgpu'. TFLOP/s count 3 x forward FLOPs; each timed function returns its
             forward output as well as the gradients (else XLA drops a forward GEMM no gradient needs).
(c) expert   on >= 2 devices, mesh (1, n, 1): all_to_all vs ragged_all_to_all exchange, each checked
  parallel   against the single-device layer (float32, small shapes) and timed per MoE layer fwd+bwd
             on V3 shapes with --ep_tokens tokens per device (ragged is skipped on CPU: XLA:CPU lacks it).

Prints a table per part and writes bench_moe.json under $OUT (when set) or --out.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_QUICK = flags.DEFINE_boolean("quick", False, "tiny shapes, xla paths only (CPU)")
_TOKENS = flags.DEFINE_list("tokens", ["16384", "32768", "65536"], "token counts for (b)")
_XLA_TOKENS = flags.DEFINE_list("xla_tokens", ["16384"], "token counts at which (b) also times grouped_gemm=xla")
_PARTS = flags.DEFINE_list("parts", ["gmm", "layer"], "rows of (b): gmm (issue 7's 0.7x bar), layer")
_EP_TOKENS = flags.DEFINE_integer("ep_tokens", 8192, "tokens per device for (c)")
_REPEAT = flags.DEFINE_integer("repeat", 3, "timed calls after one warm-up call")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for bench_moe.json")

V3 = dict(hidden=7168, ffn=2048, experts=256, k=8, shared=1, n_group=8, topk_group=4)
QUICK = dict(hidden=256, ffn=128, experts=16, k=4, shared=1, n_group=4, topk_group=2)


def timeit(fn, *args, repeat=None):
    from dsjax.timing import seconds_per_call
    return seconds_per_call(fn, *args, repeat=repeat or _REPEAT.value)


def attempt(fn):
    """fn() or {'error': ...}: a shape that does not fit or compile is recorded, not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:1500]}"}


def rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def moe_config(shape, dtype, **moe):
    from dsjax.config import ModelConfig, MoEConfig
    return ModelConfig(hidden_size=shape["hidden"], dtype=dtype, param_dtype=dtype, moe=MoEConfig(
        moe_intermediate_size=shape["ffn"], n_routed_experts=shape["experts"], num_experts_per_tok=shape["k"],
        n_shared_experts=shape["shared"], n_group=shape["n_group"], topk_group=shape["topk_group"],
        routed_scaling_factor=2.5, **moe))


def group_sizes_for(rows, groups, seed, uneven):
    import numpy as np
    r = np.random.RandomState(seed)
    if not uneven:
        return r.multinomial(rows, np.ones(groups) / groups).astype(np.int32)
    p = r.dirichlet(np.full(groups, 0.5))
    p[1::4] = 0.0  # empty groups
    return r.multinomial(rows - rows // 16, p / p.sum()).astype(np.int32)  # the last rows in no group


# ------------------------------------------------------------------------------------ (a)


def check_gmm(m, k, n, g):
    import jax
    import jax.numpy as jnp
    from dsjax.model.grouped_gemm import gmm

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    w = jax.random.normal(keys[1], (g, k, n), jnp.float32) / k ** 0.5
    ct = jax.random.normal(keys[2], (m, n), jnp.float32)
    gs = jnp.asarray(group_sizes_for(m, g, 1, uneven=True))

    def fwd_bwd(kind, dtype):
        def f(x, w, ct):
            y, vjp = jax.vjp(lambda x, w: gmm(x, w, gs, kind), x.astype(dtype), w.astype(dtype))
            return (y, *vjp(ct))
        return jax.jit(f)(x, w, ct)

    with jax.default_matmul_precision("float32"):  # no TF32 in the reference
        want = fwd_bwd("xla", jnp.float32)
    out = {"shape": [m, k, n, g], "group_sizes_sum": int(gs.sum())}
    for kind in ("xla", "pallas_mgpu"):
        got = attempt(lambda: fwd_bwd(kind, jnp.bfloat16))
        out[kind] = got if isinstance(got, dict) else {
            name: rel(a, b) for name, a, b in zip(("y", "dx", "dw"), got, want)}
    return out


# ------------------------------------------------------------------------------------ (b)


def bench_gmm(tokens, shape, kinds):
    import jax
    import jax.numpy as jnp
    from dsjax.model.grouped_gemm import gmm

    m, k, n, g = tokens * shape["k"], shape["hidden"], shape["ffn"], shape["experts"]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    ct = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    gs = jnp.asarray(group_sizes_for(m, g, 2, uneven=False))
    flops = 3 * 2 * m * k * n
    row = {"rows": m, "K": k, "N": n, "groups": g, "tflop": flops / 1e12}

    def vjp_of(f):  # y is returned too: else XLA drops the forward GEMM, which no gradient needs
        def fwd_bwd(x, w, ct):
            y, vjp = jax.vjp(f, x, w)
            return y, vjp(ct)
        return jax.jit(fwd_bwd)

    w_dense = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
    row["dense_tflops"] = flops / timeit(vjp_of(lambda x, w: jnp.dot(x, w)), x, w_dense, ct) / 1e12
    del w_dense
    w = jax.random.normal(keys[1], (g, k, n), jnp.bfloat16)
    for kind in kinds:
        # covered: the groups hold every row, as in the model's single-device dropless dispatch
        fn = vjp_of(lambda x, w, kind=kind: gmm(x, w, gs, kind, out_dtype=jnp.bfloat16, covered=True))
        row[kind] = attempt(lambda: {"tflops": flops / timeit(fn, x, w, ct, repeat=xla_repeat(kind)) / 1e12})
    return row


def xla_repeat(kind):
    return 1 if kind == "xla" and not _QUICK.value else None  # XLA's densified ragged_dot takes seconds


def layer_flops(tokens, shape):
    d, f, e = shape["hidden"], shape["ffn"], shape["experts"]
    return 3 * tokens * (2 * d * e + (shape["k"] + shape["shared"]) * 3 * 2 * d * f)


def bench_layer(tokens, shape, kinds, dtype):
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from dsjax.model.layers import SwiGLU
    from dsjax.model.moe import MoE

    seq = min(tokens, 4096)
    b = tokens // seq
    x = jax.random.normal(jax.random.key(0), (b, seq, shape["hidden"]), dtype)
    seg = jnp.ones((b, seq), jnp.int32)
    ct = jax.random.normal(jax.random.key(1), x.shape, dtype)
    flops = layer_flops(tokens, shape)
    row = {"tokens": tokens, "tflop": flops / 1e12}

    def grad_time(module, variables, repeat=None):
        def f(params, x, ct):
            def fwd(p, x):
                y = module.apply({**variables, "params": p}, x, seg) if isinstance(module, MoE) else \
                    module.apply({"params": p}, x)
                return y[0] if isinstance(y, tuple) else y
            y, vjp = jax.vjp(fwd, params, x)
            return y, vjp(ct)  # y too, or XLA drops the last forward GEMM
        return timeit(jax.jit(f), variables["params"], x, ct, repeat=repeat)

    config = moe_config(shape, "bfloat16" if dtype == jnp.bfloat16 else "float32")
    dense = SwiGLU((shape["k"] + shape["shared"]) * shape["ffn"], config)
    dense_vars = nn.unbox(jax.jit(dense.init)(jax.random.key(2), x))
    row["dense_swiglu_tflops"] = flops / grad_time(dense, dense_vars) / 1e12
    del dense_vars
    variables = nn.unbox(jax.jit(MoE(config).init)(jax.random.key(3), x[:1, :8], seg[:1, :8]))
    for kind in kinds:
        from dsjax.config import replace
        module = MoE(replace(config, **{"moe.grouped_gemm": kind}))
        row[kind] = attempt(lambda: {"tflops": flops / grad_time(module, variables, xla_repeat(kind)) / 1e12})
    return row


# ------------------------------------------------------------------------------------ (c)


def ep_run(config, mesh, x, variables, seg):
    """(y, grads) of the MoE layer, under `mesh` (expert parallel) or on one device (mesh None)."""
    import contextlib
    import jax
    from flax import linen as nn
    from dsjax import sharding as shd
    from dsjax.model.moe import MoE

    ct = jax.random.normal(jax.random.key(9), x.shape, x.dtype)

    def f(params, x, ct):
        y, vjp = jax.vjp(lambda p, x: MoE(config).apply({**variables, "params": p}, x, seg)[0], params, x)
        return y, vjp(ct)

    def in_mesh(fn):
        ctx = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
        with ctx, nn.logical_axis_rules(shd.ACTIVATION_RULES):
            return fn()

    step = jax.jit(f)
    out = in_mesh(lambda: step(variables["params"], x, ct))
    return out, (lambda: in_mesh(lambda: timeit(step, variables["params"], x, ct)))


def sharded_init(config, mesh, x, seg):
    import jax
    from flax import linen as nn
    from dsjax import sharding as shd
    from dsjax.model.moe import MoE

    init = lambda: MoE(config).init(jax.random.key(3), x[:, :8], seg[:, :8])  # noqa: E731
    out = shd.logical_shardings(jax.eval_shape(init), mesh, shd.param_rules())
    with jax.set_mesh(mesh):
        return jax.jit(lambda: nn.unbox(init()), out_shardings=out)()


def bench_ep(n_dev, big_shape, small_shape, on_cpu, grouped_gemm):
    import jax
    import jax.numpy as jnp
    from dsjax import sharding as shd
    from dsjax.config import replace

    mesh = jax.make_mesh((1, n_dev, 1), shd.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:n_dev])
    exchanges = ["all_to_all"] + ([] if on_cpu else ["ragged_all_to_all"])
    out = {"devices": n_dev, "check": {}, "time": {}}
    # correctness: float32, small shapes, against the one-device layer
    config = moe_config(small_shape, "float32")
    x = jax.random.normal(jax.random.key(0), (n_dev * 2, 256, small_shape["hidden"]), jnp.float32)
    seg = jnp.ones(x.shape[:2], jnp.int32)
    variables = sharded_init(config, mesh, x, seg)
    want, _ = ep_run(config, None, x, jax.device_get(variables), seg)
    for ex in exchanges:
        def check(ex=ex):
            got, _ = ep_run(replace(config, **{"moe.expert_parallel": ex}), mesh, x, variables, seg)
            leaves = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
            return {"max_rel_err": max(rel(a, b) for a, b in leaves)}
        out["check"][ex] = attempt(check)
    # time: bf16, V3 shapes
    config = moe_config(big_shape, "bfloat16", grouped_gemm=grouped_gemm)
    per_device = 256 if _QUICK.value else _EP_TOKENS.value
    tokens = n_dev * per_device
    seq = min(per_device, 4096)
    x = jax.random.normal(jax.random.key(0), (tokens // seq, seq, big_shape["hidden"]), jnp.bfloat16)
    seg = jnp.ones(x.shape[:2], jnp.int32)
    variables = sharded_init(config, mesh, x, seg)
    flops = layer_flops(tokens, big_shape)
    for ex in exchanges:
        def run(ex=ex):
            _, time_it = ep_run(replace(config, **{"moe.expert_parallel": ex}), mesh, x, variables, seg)
            seconds = time_it()
            return {"ms_per_layer": seconds * 1e3, "tflops_per_device": flops / seconds / 1e12 / n_dev}
        out["time"][ex] = attempt(run)
    return out


# ---------------------------------------------------------------------------------- report


def fmt(r, key="tflops"):
    return r["error"][:200] if "error" in r else f"{r[key]:8.1f}"


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    quick = _QUICK.value
    on_cpu = jax.devices()[0].platform == "cpu"
    shape = QUICK if quick else V3
    tokens = [256, 512] if quick else [int(t) for t in _TOKENS.value]
    xla_tokens = set(tokens) if quick else {int(t) for t in _XLA_TOKENS.value}
    kinds = ["xla"] if on_cpu else ["xla", "pallas_mgpu"]
    result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__,
              "quick": quick, "shape": shape}

    print("(a) grouped GEMM vs jax.lax.ragged_dot (float32 reference), relative error ‖a−b‖/‖b‖", flush=True)
    result["check"] = check_gmm(*((512, 128, 256, 8) if quick else (4096, 7168, 2048, 32)))
    for kind in kinds:
        r = result["check"][kind]
        print(f"  {kind:12s} " + (r["error"] if "error" in r else
                                  "  ".join(f"{name} {err:.2e}" for name, err in r.items())), flush=True)

    print("(b) fwd+bwd TFLOP/s, DeepSeek-V3 expert shapes" + (" (quick: tiny shapes)" if quick else ""), flush=True)
    result["gmm"], result["layer"] = [], []
    header = " ".join(f"{k:>12s}" for k in kinds)
    print(f"  {'tokens':>7s} {'what':>6s} {'dense':>8s} {header}  ratio", flush=True)
    def save():  # after every row: a run cut short by its time limit keeps what it measured
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "bench_moe.json"), "w") as f:
            json.dump(result, f, indent=2)

    for t in tokens:
        use = [k for k in kinds if k != "xla" or t in xla_tokens]
        for what, fn, dense_key in (("gmm", lambda: bench_gmm(t, shape, use), "dense_tflops"),
                                    ("layer", lambda: bench_layer(t, shape, use, jnp.bfloat16), "dense_swiglu_tflops")):
            if what not in _PARTS.value:
                continue
            row = attempt(fn)
            row.setdefault("tokens", t)
            result[what].append(row)
            if "error" in row:
                print(f"  {t:7d} {what:>6s} FAILED {row['error']}", flush=True)
                continue
            best = max((row[k]["tflops"] for k in use if "tflops" in row[k]), default=0.0)
            cells = " ".join(f"{fmt(row[k]) if k in row else '-':>12s}" for k in kinds)
            print(f"  {t:7d} {what:>6s} {row[dense_key]:8.1f} {cells}  {best / row[dense_key]:.2f}", flush=True)
            save()

    n_dev = jax.device_count()
    if n_dev >= 2:
        n_dev = 1 << (n_dev.bit_length() - 1)
        print(f"(c) expert parallel over {n_dev} devices, mesh (1, {n_dev}, 1)", flush=True)
        big = QUICK if quick else V3
        small = dict(QUICK, experts=max(QUICK["experts"], 2 * n_dev))
        result["expert_parallel"] = attempt(lambda: bench_ep(n_dev, big, small, on_cpu, kinds[-1]))
        ep = result["expert_parallel"]
        if "error" in ep:
            print(f"  FAILED {ep['error']}", flush=True)
        else:
            for ex in ep["check"]:
                c, t = ep["check"][ex], ep["time"].get(ex, {"error": "not run"})
                print(f"  {ex:18s} check {fmt(c, 'max_rel_err') if 'error' in c else format(c['max_rel_err'], '.2e')}"
                      f"  {fmt(t, 'ms_per_layer')} ms/layer"
                      + ("" if "error" in t else f"  {t['tflops_per_device']:.1f} TFLOP/s per device"), flush=True)
    else:
        print("(c) expert parallel: skipped (one device)", flush=True)
    save()


if __name__ == "__main__":
    if "--quick" in sys.argv:
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    app.run(main)

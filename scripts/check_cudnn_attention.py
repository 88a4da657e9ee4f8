"""Check and time dsjax/model/cudnn_attention.py on one GPU (~30 s): packed segments vs the XLA path.

    python scripts/check_cudnn_attention.py [--out DIR]

(a) Correctness, relative Frobenius error vs the model's XLA attention (float32 softmax over an
    explicit causal + same-segment mask) on the same bf16 inputs, over the non-padding tokens:
    output, dq, dk, dv — for rows packed with several documents and trailing padding (the packed
    cuDNN layout), and for a batch with a row of more than MAX_RUNS documents (the masked fallback).
    FAIL above 2e-2 (bf16 inputs, flash vs two-pass softmax). With several GPUs, also the packed
    path on a data mesh over all of them against one device (FAIL above 1e-3).
(b) Forward + backward time at configs/small.py's shapes (B 8, T 2048, 16 heads, 128 + 64 / 128
    dims): packed cuDNN, the masked fallback forced, and causal-only cuDNN (no segments) as the floor.
Writes cudnn_attention.json under $OUT (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOL = 2e-2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsjax.model import cudnn_attention as ca
    from dsjax.model.mla import attention_mask

    def inputs(b, t, h=16, k=128, r=64, o=128, seed=0):
        keys = jax.random.split(jax.random.key(seed), 5)
        n = lambda i, shape: jax.random.normal(keys[i], shape, jnp.bfloat16)  # noqa: E731
        return n(0, (b, t, h, k)), n(1, (b, t, h, r)), n(2, (b, t, h, k)), n(3, (b, t, r)), n(4, (b, t, h, o))

    def segments(b, t, docs_per_row, seed=0):
        rng = np.random.RandomState(seed)
        seg = np.zeros((b, t), np.int32)
        for i in range(b):
            cuts = np.sort(rng.choice(np.arange(1, t - 8), docs_per_row, replace=False))
            for j, (a, z) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
                seg[i, a:z] = j + 1  # the tail after the last cut stays 0: padding
        return jnp.asarray(seg)

    def positions(seg):
        start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        idx = jnp.arange(seg.shape[1])[None, :]
        return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)

    def xla_attention(qn, qr, kn, kr, v, seg, scale):
        s = (jnp.einsum("BTHK,BSHK->BHTS", qn, kn, preferred_element_type=jnp.float32)
             + jnp.einsum("BTHR,BSR->BHTS", qr, kr, preferred_element_type=jnp.float32)) * scale
        mask = attention_mask(positions(seg), seg)[:, None]
        p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
        return jnp.einsum("BHTS,BSHO->BTHO", p, v.astype(jnp.float32)).astype(v.dtype)

    def loss_grads(fn, x, seg):
        real = (seg > 0)[:, :, None, None].astype(jnp.float32)
        return jax.jit(jax.value_and_grad(lambda *a: ((fn(*a, seg, 0.1).astype(jnp.float32) * real) ** 2).sum(),
                                          argnums=(0, 1, 2, 3, 4)))(*x)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": {}, "ms": {}}
    failed = []
    for name, docs in (("packed", 5), ("fallback", ca.MAX_RUNS + 4)):
        x = inputs(2, 512, seed=1)
        seg = segments(2, 512, docs, seed=docs)
        (_, g_ref), (_, g) = loss_grads(xla_attention, x, seg), loss_grads(ca.attention, x, seg)
        out_ref = xla_attention(*x, seg, 0.1) * (seg > 0)[:, :, None, None]
        out = ca.attention(*x, seg, 0.1) * (seg > 0)[:, :, None, None]
        for what, a, b in [("out", out, out_ref)] + [(f"d{n}", g[i], g_ref[i]) for i, n in
                                                     enumerate(("q_nope", "q_rope", "k_nope", "k_rope", "v"))]:
            err = rel(a, b)
            res["checks"][f"{name} {what}"] = err
            ok = np.isfinite(err) and err < TOL
            failed += [] if ok else [f"{name} {what}"]
            print(f"  {'ok  ' if ok else 'FAIL'} {name:8s} {what:7s} rel err {err:.2e}", flush=True)

    if jax.device_count() > 1:  # the per-device shard_map: batch rows over every device
        from dsjax import sharding as shd
        from dsjax.config import MeshConfig

        x, seg = inputs(8, 512, seed=2), segments(8, 512, 5, seed=7)
        one = ca.attention(*x, seg, 0.1)
        with jax.set_mesh(shd.make_mesh(MeshConfig(data=jax.device_count()))):
            many = jax.jit(lambda *a: ca.attention(*a, 0.1))(*x, seg)
        err = rel(many * (seg > 0)[:, :, None, None], one * (seg > 0)[:, :, None, None])
        res["checks"][f"packed on {jax.device_count()} devices vs one"] = err
        ok = np.isfinite(err) and err < 1e-3
        failed += [] if ok else ["multi-device"]
        print(f"  {'ok  ' if ok else 'FAIL'} packed on {jax.device_count()} devices vs one: rel err {err:.2e}", flush=True)

    x = inputs(8, 2048)
    cases = {"packed (3 docs per row)": (ca.attention, segments(8, 2048, 3)),
             "masked fallback": (ca.attention, segments(8, 2048, ca.MAX_RUNS + 4)),
             "causal only, no segments": (None, None)}
    for name, (fn, seg) in cases.items():
        if fn is None:
            def fn(qn, qr, kn, kr, v, seg, scale):
                q, k, vv = ca._expand(qn, qr, kn, kr, v)
                return jax.nn.dot_product_attention(q, k, vv, scale=scale, is_causal=True,
                                                    implementation="cudnn")[..., :v.shape[-1]]
            seg = jnp.ones((8, 2048), jnp.int32)
        step = jax.jit(jax.grad(lambda *a: (fn(*a, seg, 0.1).astype(jnp.float32) ** 2).sum(), argnums=(0, 2, 4)))
        jax.block_until_ready(step(*x))
        t0 = time.perf_counter()
        for _ in range(20):
            out = step(*x)
        jax.block_until_ready(out)
        res["ms"][name] = (time.perf_counter() - t0) / 20 * 1e3
        print(f"  fwd+bwd {name:26s} {res['ms'][name]:.2f} ms", flush=True)
    res["failed"] = failed
    print("RESULT: " + ("all checks passed" if not failed else f"FAILED {failed}"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cudnn_attention.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

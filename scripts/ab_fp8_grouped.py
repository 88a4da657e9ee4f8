"""Time versions of the FP8 M-grouped kernel against each other, interleaved in one process (one GPU).

    git show HEAD~1:dsjax/fp8/grouped_kernel.py > /tmp/gk_before.py
    python scripts/ab_fp8_grouped.py --variants=before=/tmp/gk_before.py,after=dsjax/fp8/grouped_kernel.py
    python scripts/ab_fp8_grouped.py --variants=a=dsjax/fp8/grouped_kernel.py,b=dsjax/fp8/grouped_kernel.py@128x128.m.4.4.lane \
        --shapes="V3 down fwd"
    python scripts/ab_fp8_grouped.py --variants=a=dsjax/fp8/grouped_kernel.py --dense   # + dense ceilings

A kernel change worth a few percent is lost in the drift between processes and calls (clocks, power,
the GPU drawn): four runs of scripts/check_fp8_grouped.py in one call (2026-11-29), one per code
version, timed the same bf16 kernel at 498-544 TFLOP/s. Here code versions run in one process: every
variant (`NAME=PATH[@SPEC]`: a copy of dsjax/fp8/grouped_kernel.py, loaded as its own module, with its
M_GROUPED or the kernel.Config spec SPEC) and the bf16 grouped kernel (grouped_gemm.MGPU) run on
the same operands, after 3 s of load, in rounds (check_common.interleaved): each round times 20
back-to-back calls of each, and the figure is the median over 7 rounds (the best round beside it).
The GPU's clocks and power are recorded at the start and after each shape (check_common.gpu_state). Before timing, each variant's
output is compared with the first's (relative Frobenius difference; bit-equal variants print 0) and
with dequantized per-group products on four groups (check_fp8_grouped.sampled_groups_error).

Shapes (--shapes: name prefixes, comma-separated; default all): DeepSeek-V3's expert GEMMs, 131,072
rows over 256 experts, bf16 outputs, as check_fp8_grouped.py builds them — the down forward (K = 2048,
N = 7168) and up/gate dgrad (the same K and N), both with Dirichlet(2)-uneven expert loads (operands
from check_fp8_grouped.raw and .quantized, seed 3, as its timed shapes), the down
forward with 512 rows per expert (no tile straddles two experts), and the up/gate forward (K = 7168);
then the two K = 2048 GEMMs as one GPU of V3's 64-way expert parallelism runs them: 4 experts,
32,768 rows (~8,192 each, Dirichlet-uneven; DeepGEMM's grouped benchmark shape, 4 x 8192).
Writes ab_fp8_grouped.json under $OUT (or --out).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from check_common import gpu_state, interleaved  # noqa: E402  (scripts/ is on sys.path when run)
from check_fp8_grouped import quantized, raw, sampled_groups_error  # noqa: E402

# name -> (M rows, K, N, G experts, GEMM, equal loads)
SHAPES = {
    "V3 down fwd": (131_072, 2048, 7168, 256, "fwd", False),
    "V3 up/gate dgrad": (131_072, 7168, 2048, 256, "dgrad", False),
    "V3 down fwd, 512 rows each": (131_072, 2048, 7168, 256, "fwd", True),
    "V3 up/gate fwd": (131_072, 7168, 2048, 256, "fwd", False),
    "V3/EP64 down fwd": (32_768, 2048, 7168, 4, "fwd", False),
    "V3/EP64 up/gate dgrad": (32_768, 7168, 2048, 4, "dgrad", False),
}
ROUNDS, CALLS, LOAD_S = 7, 20, 3.0


def load_variant(name: str, spec: str):
    """(module, config or None) for NAME=PATH[@SPEC]."""
    path, _, config = spec.partition("@")
    if not os.path.isfile(path):
        raise SystemExit(f"--variants {name}: no file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"grouped_kernel_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, module.Config.parse(config) if config else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="NAME=PATH[@SPEC],... (at least one)")
    parser.add_argument("--shapes", default="", help="name prefixes of SHAPES to time (default: all)")
    parser.add_argument("--dense", action="store_true",
                        help="also time dense GEMMs of the same M, K, N on expert 0's weights: bf16 jnp.dot and "
                             "kernel.block_scaled_matmul (the ceilings without grouping)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for ab_fp8_grouped.json")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from dsjax.fp8 import kernel
    from dsjax.model import grouped_gemm

    variants = {}
    for item in args.variants.split(","):
        name, sep, spec = item.partition("=")
        if not sep or not name or name == "bf16" or name in variants:
            parser.error(f"--variants: {item!r} is not a new NAME=PATH[@SPEC] (NAME not bf16)")
        variants[name] = load_variant(name, spec)
    prefixes = tuple(p.strip() for p in args.shapes.split(",") if p.strip())
    shapes = {k: v for k, v in SHAPES.items() if not prefixes or k.startswith(prefixes)}
    if not shapes:
        parser.error(f"--shapes {args.shapes!r} matches none of {list(SHAPES)}")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; variants {list(variants)}", flush=True)

    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shapes": {},
              "gpu_state": {"start": gpu_state()}}  # and after each shape: clocks, power
    print(f"GPU at start: {result['gpu_state']['start']}", flush=True)
    for sname, (M, K, N, G, gemm, equal) in shapes.items():
        x, w, dy, gs = raw(M, K, N, G, seed=3, dtype=jnp.bfloat16)
        if equal:
            gs = jnp.full((G,), M // G, jnp.int32)
        fwd, dgrad, _ = quantized(x, w, dy, gs)
        if gemm == "fwd":  # y = x @ w[g]
            fp8_args = (*fwd, gs)
            fns = {"bf16": (jax.jit(grouped_gemm.MGPU.forward), (x, w, gs))}
        else:  # dx = dy @ w[g]^T
            fp8_args = (*dgrad, gs)
            fns = {"bf16": (jax.jit(grouped_gemm.MGPU.input_grad), (dy, w, gs))}
        fp8_args = jax.block_until_ready(fp8_args)
        if args.dense:  # the same FLOPs with one weight matrix: the grouping's cost is the difference
            dense_bf16 = (x, w[0]) if gemm == "fwd" else (dy, w[0].T)
            fns["dense bf16"] = (jax.jit(jnp.dot), dense_bf16)
            qa, sa, qb, sb = fp8_args[:4]
            fns["dense fp8"] = (jax.jit(functools.partial(kernel.block_scaled_matmul, out_dtype=jnp.bfloat16,
                                                          sb_blocked=True)), (qa, sa, qb[0], sb[0]))
        for name, (module, cfg) in variants.items():
            fns[name] = (jax.jit(functools.partial(module.m_grouped_matmul, out_dtype=jnp.bfloat16, config=cfg,
                                                   sb_blocked=True)), fp8_args)
        first, diffs, errors = None, {}, {}
        for name, (fn, operands) in fns.items():  # compile; each variant's output against the first's
            y = jax.block_until_ready(fn(*operands))  # and against per-group products on 4 groups
            if name in variants:
                errors[name] = sampled_groups_error(y, *fp8_args)
                y = y.astype(jnp.float32)
                first = y if first is None else first
                diffs[name] = float(jnp.linalg.norm(y - first) / jnp.linalg.norm(first))
        times = interleaved(fns, ROUNDS, CALLS, LOAD_S)  # bf16 first: its calls are the load
        flops = 2.0 * M * K * N
        median = {n: flops / statistics.median(t) / 1e12 for n, t in times.items()}
        best = {n: flops / min(t) / 1e12 for n, t in times.items()}
        result["shapes"][sname] = {"shape": [M, K, N, G], "tflops_median": median, "tflops_best": best,
                                   "rel_diff_to_first": diffs, "rel_error_on_sampled_groups": errors}
        print(f"{sname} ({M} x {K} x {N} / {G}), TFLOP/s median (ratio to bf16; best round):", flush=True)
        for n in fns:
            diff = f"  diff to first {diffs[n]:.1e}, error {errors[n]:.1e}" if n in diffs else ""
            print(f"  {n:>12s} {median[n]:6.0f} ({median[n] / median['bf16']:.3f}x; best {best[n]:.0f}){diff}",
                  flush=True)
        result["gpu_state"][f"after {sname}"] = gpu_state()
        print(f"  GPU now: {result['gpu_state'][f'after {sname}']}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ab_fp8_grouped.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

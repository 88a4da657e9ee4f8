"""Check and time dsjax/fp8/kernel.py's block-scaled FP8 GEMM on one Hopper GPU (one run, ~1-2 min).

    python scripts/check_fp8_kernel.py [--quick] [--out DIR]      # on the GPU machine
    python scripts/check_fp8_kernel.py --cpu-interpret             # dry run on CPU, jax >= 0.11 (~5 min)

(a) Correctness, relative Frobenius error (expected ~1e-4 or better; FAIL above 2e-3):
    - the kernel vs dot.py's XLA split-K reference (`_split_k_matmul`, backend xla_gpu) on the same
      quantized operands, for every tile config, plus an unaligned shape (M, K, N not multiples of
      the tiles: padded inside the wrapper);
    - make_dot("block", "pallas_gpu") vs make_dot("block", "xla_gpu"): y, dx, dw (fwd + both grads,
      f32 operands so that bf16 rounding does not hide the comparison), and that the compiled HLO
      holds three Mosaic GPU custom calls.
(b) Speed, TFLOP/s (2MNK / median over 5 rounds of 10 back-to-back calls on pre-quantized operands,
    every GEMM of a shape timed in turn within each round: check_common.interleaved): the kernel
    per config vs bf16 jnp.dot vs XLA per-tensor FP8 (cuBLASLt, ANY_F8_ANY_F8_F32), and the XLA
    split-K block path on the first shape; then block-mode fwd+bwd through make_dot, pallas_gpu vs
    xla_gpu vs tensor vs none.
Tile configs (kernel.Config): 128x128 CTA tile with two 64x128 math warpgroups and 4 stages (the
default), the same with wgrad's per-column sb ("col"), 3 stages with a wider snake, a 64x256 tile
split along N, and the default under Warpgroup lowering semantics ("wg"). Every kernel compile is
guarded, so one failing config does not stop the run; errors are listed compactly at the end.
Writes fp8_kernel.json under $OUT (or --out) after each section.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from check_common import fwd_bwd_ms, gpu_state, interleaved, ms_line, report, short_error  # noqa: E402  (scripts/ is on sys.path when run)

SHAPES = ((4096, 7168, 2048), (4096, 2048, 7168), (16384, 7168, 7168))  # M, K, N
CHECK_SHAPE = (1024, 1536, 768)
UNALIGNED_SHAPE = (300, 1000, 200)  # pads M, K and N
TOL = 2e-3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="first shape only, default config only")
    parser.add_argument("--cpu-interpret", action="store_true",
                        help="dry run of this script on CPU (jax >= 0.11): tiny shapes, the kernel in Pallas's "
                             "Mosaic GPU interpreter, xla_cpu references; timings meaningless")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # partial output survives a timeout

    if args.cpu_interpret:  # its warpgroup threads hung on one CPU device (jax 0.11.2); tests use 8
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from dsjax.fp8 import dot as D
    from dsjax.fp8 import kernel as K
    from dsjax.fp8 import make_dot
    from dsjax.fp8.quantize import quantize_blocks

    ref_backend = "xla_gpu"
    shapes, check_shape, unaligned_shape = SHAPES, CHECK_SHAPE, UNALIGNED_SHAPE
    layer_shape = (8192, 7168, 2048)
    if args.cpu_interpret:
        from dsjax.fp8 import interpret
        interpret.use_interpreters()  # every FP8 kernel interpreted; the pallas_gpu check passes (dry run only)
        ref_backend = "xla_cpu"
        shapes, check_shape, layer_shape = ((256, 384, 256),), (256, 384, 256), (256, 256, 128)
        unaligned_shape = (100, 200, 136)

    # name -> (config, sb_blocked); sb_blocked=True is the forward/dgrad path (one sb per 128 columns),
    # False wgrad's per-column sb. "lane" / "wg" is the Pallas lowering semantics.
    configs = {
        "128x128s4": (K.DEFAULT, True),
        "128x128s4 col": (K.DEFAULT, False),
        "128x128s3w8": (K.Config(stages=3, grid_tile_width=8), True),
        "64x256n s3": (K.Config(cta_m=64, cta_n=256, wg_dim="n", stages=3), True),
        "wg 128x128s4": (K.Config(semantics="warpgroup"), True),
        "128x128s4w8": (K.Config(grid_tile_width=8), True),
        "128x128s5w4": (K.Config(stages=5), True),
        "128x128s4w2": (K.Config(grid_tile_width=2), True),
        "wg 128x128s3w8": (K.Config(stages=3, grid_tile_width=8, semantics="warpgroup"), True),
    }
    if args.quick:
        configs = {k: configs[k] for k in ("128x128s4", "128x128s4 col")}
    shapes = shapes[:1] if args.quick else shapes
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "jax": jax.__version__,
           "configs": {k: f"{cfg!r}, sb_blocked={b}" for k, (cfg, b) in configs.items()},
           "checks": {}, "tflops": {}, "errors": {}}
    print(f"{dev.device_kind}, jax {jax.__version__}, {getattr(dev, 'core_count', '?')} SMs")
    res["gpu_state"] = {"start": gpu_state()}
    print(f"GPU at start: {res['gpu_state']['start']}")
    failed = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fp8_kernel.json")

    def save():  # after each section, so that a hang or crash later keeps what was measured
        res["failed"] = failed
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def operands(M, Kd, N, seed=0):
        kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
        # Rows with different magnitudes so that per-row scales matter.
        x = jax.random.normal(kx, (M, Kd), jnp.float32) * jnp.exp(jax.random.normal(ks, (M, 1)))
        w = jax.random.normal(kw, (Kd, N), jnp.float32) * 0.05
        qx, sx = quantize_blocks(x, (1, 128))
        qw, sw = quantize_blocks(w, (128, 128))
        sb = D._per_column(sw, N)
        return x, w, qx, sx, qw, sw, sb

    def record(name, err):
        ok = err is not None and err < TOL
        res["checks"][name] = err
        if not ok:
            failed.append(name)
        print(f"  {'ok  ' if ok else 'FAIL'} {name:44s} rel err {err:.2e}" if err is not None
              else f"  FAIL {name}")

    # ---- (a) correctness ----------------------------------------------------------------------
    print("(a) correctness: relative Frobenius error vs the XLA split-K path (same quantized operands)")
    for shape_name, (M, Kd, N) in (("aligned", check_shape), ("unaligned", unaligned_shape)):
        _, _, qx, sx, qw, _, sb = operands(M, Kd, N)
        ref = jax.jit(lambda a, s, b, t: D._split_k_matmul(a, s, b, t, ref_backend))(qx, sx, qw, sb)
        qwT = qw.T
        for cname, (cfg, blocked) in configs.items():
            if shape_name == "unaligned" and cfg != K.DEFAULT:
                continue
            # float32 output where its tile fits shared memory beside the stages, else bf16 (as the
            # speed section runs it) against the reference rounded to bf16
            out = jnp.float32 if cfg.smem_bytes(jnp.float32) <= K.SMEM_LIMIT else jnp.bfloat16
            name = f"kernel[{cname}] {shape_name} {M}x{Kd}x{N}" + ("" if out == jnp.float32 else " (bf16 out)")
            try:
                f = jax.jit(functools.partial(K.block_scaled_matmul, out_dtype=out, config=cfg,
                                              sb_blocked=blocked))
                record(name, rel(f(qx, sx, qwT, sb), ref.astype(out)))
            except Exception as e:  # noqa: BLE001 - report and continue with the next config
                res["errors"][name] = short_error(e)
                record(name, None)
                print("      " + short_error(e))

    # make_dot: forward and both gradients, pallas_gpu vs xla_gpu.
    M, Kd, N = check_shape
    x, w, *_ = operands(M, Kd, N, seed=1)
    dy = jax.random.normal(jax.random.key(2), (M, N), jnp.float32)

    def fwd_bwd(backend):
        dot = make_dot("block", backend)

        def f(x, w):
            y, vjp = jax.vjp(lambda x, w: dot(x, w), x, w)
            return (y, *vjp(dy))
        return jax.jit(f)

    try:
        want = fwd_bwd(ref_backend)(x, w)
        f_pallas = fwd_bwd("pallas_gpu")
        hlo = f_pallas.lower(x, w).compile().as_text()
        n_calls = len(re.findall(r'custom_call_target="mosaic_gpu', hlo))
        got = f_pallas(x, w)
        for nm, g, r in zip(("y", "dx", "dw"), got, want):
            record(f"make_dot pallas_gpu vs {ref_backend} {nm}", rel(g, r))
        if not args.cpu_interpret:  # the interpreter leaves no Mosaic GPU custom call
            print(f"  {'ok  ' if n_calls >= 3 else 'FAIL'} compiled fwd+bwd HLO: {n_calls} Mosaic GPU calls (want 3)")
            res["checks"]["make_dot mosaic_gpu calls"] = n_calls
            if n_calls < 3:
                failed.append("make_dot mosaic_gpu calls")
    except Exception as e:  # noqa: BLE001
        res["errors"]["make_dot"] = short_error(e)
        failed.append("make_dot")
        print("  FAIL make_dot pallas_gpu: " + short_error(e))

    save()

    # ---- (b) speed ----------------------------------------------------------------------------
    print("(b) TFLOP/s (2MNK / median time; kernel on pre-quantized operands, bf16 out)")
    header = f"  {'M x K x N':>17s} {'bf16':>6s} {'fp8 tensor':>10s} {'xla split-K':>11s} " + " ".join(
        f"{c:>13s}" for c in configs)
    print(header)
    for (M, Kd, N) in shapes:
        shape = f"{M}x{Kd}x{N}"
        fns = {}

        def bench_row(name, fn, *a):  # compiled now (a failure is recorded, not fatal), timed below
            try:
                jax.block_until_ready(fn(*a))
                fns[name] = (fn, a)
            except Exception as e:  # noqa: BLE001 - report and continue
                res["errors"][f"{name} {shape}"] = short_error(e)

        x, w, qx, sx, qw, sw, sb = operands(M, Kd, N)
        qwT = jax.block_until_ready(qw.T)
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

        bench_row("bf16", jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)), xb, wb)
        sxt, swt = jnp.max(sx), jnp.max(sw)  # any per-tensor scalars: same GEMM cost
        bench_row("fp8 tensor", jax.jit(lambda a, b, s, t: (lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), precision=lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32,
            preferred_element_type=jnp.float32) * (s * t)).astype(jnp.bfloat16)), qx, qw, sxt, swt)
        if (M, Kd, N) == shapes[0]:
            bench_row("xla split-K", jax.jit(lambda a, s, b, t: D._split_k_matmul(a, s, b, t, ref_backend).astype(
                jnp.bfloat16)), qx, sx, qw, sb)
        for cname, (cfg, blocked) in configs.items():
            bench_row(cname, jax.jit(functools.partial(
                K.block_scaled_matmul, out_dtype=jnp.bfloat16, config=cfg, sb_blocked=blocked)), qx, sx, qwT, sb)
        times = interleaved(fns, rounds=5, calls=10) if fns else {}  # round-robin: drift moves all alike
        row = {name: 2.0 * M * Kd * N / statistics.median(t) / 1e12 for name, t in times.items()}
        res["tflops"][shape] = row
        save()
        def fmt(v, wd):
            return f"{v:{wd}.0f}" if v is not None else "-".rjust(wd)
        print(f"  {shape:>17s} {fmt(row.get('bf16'), 6)} {fmt(row.get('fp8 tensor'), 10)} "
              f"{fmt(row.get('xla split-K'), 11)} " + " ".join(fmt(row.get(c), 13) for c in configs))

    # Full block-mode layer GEMM, fwd + both grads (quantization included), bf16 x / f32 w.
    M, Kd, N = layer_shape
    x = jax.random.normal(jax.random.key(3), (M, Kd), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (Kd, N), jnp.float32) * 0.02
    layer = {}
    for label, mode, backend in (("none", "none", ref_backend), ("tensor", "tensor", ref_backend),
                                 (f"block {ref_backend}", "block", ref_backend),
                                 ("block pallas_gpu", "block", "pallas_gpu")):
        try:
            layer[label] = fwd_bwd_ms(make_dot(mode, backend), x, w)
        except Exception as e:  # noqa: BLE001
            layer[label] = None
            res["errors"][f"layer {label}"] = short_error(e)
    res["layer_fwd_bwd_ms"] = {"shape": [M, Kd, N], **layer}
    print(f"  fwd+bwd {M}x{Kd}x{N} (ms): " + ms_line(layer))

    res["gpu_state"]["end"] = gpu_state()
    print(f"GPU at end: {res['gpu_state']['end']}")
    save()
    report(res, failed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

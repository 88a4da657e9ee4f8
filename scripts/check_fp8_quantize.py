"""GPU check of the fused FP8 quantization kernels (dsjax/fp8/quantize_kernel.py): correctness against
the XLA passes they replace, and time and bandwidth of both.

    python scripts/check_fp8_quantize.py          # one H200, well under a minute

For each shape — configs/small.py's expert activations (98,304 sorted rows over 64 uneven groups,
D = 2048 and 2816, and 1408 for the down projection's input) and a dense layer's (16,384 x 2048, one
group) — runs the kernel and the XLA path (quantize_blocks in 1x128 tiles + grouped.quantize_wgrad)
on the same input, compares the bits of q and the scales on the groups' rows (the XLA path may differ
by one E4M3 step where x / scale lies within a float32 ulp of a rounding midpoint: XLA computes
x * fl(1/scale), the kernel too, but XLA:GPU may fuse differently), and prints milliseconds and GB/s
(bytes read + written by the kernel: 2 per input element, 2 per output element, plus scales).
Then the same for the weights' kernel (128x128 blocks, w and w^T from one read) on small.py's
stacked expert weights and a dense kernel, against quantize_blocks of w and of w^T. Writes check_fp8_quantize.json under $OUT (or --out).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from check_common import report, short_error, timed  # noqa: E402  (scripts/ is on sys.path when run)

_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for check_fp8_quantize.json")

WEIGHTS = (("experts gate+up [64, 2048, 2816]", (64, 2048, 2816)), ("experts down [64, 1408, 2048]", (64, 1408, 2048)),
           ("dense [1, 2048, 2816]", (1, 2048, 2816)))
SHAPES = (("experts x (up/gate input)", 98304, 2048, 64), ("experts dy (up/gate output)", 98304, 2816, 64),
          ("experts h (down input)", 98304, 1408, 64), ("dense x", 16384, 2048, 1))


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dsjax.fp8 import grouped, quantize_blocks, quantize_kernel

    res, failed = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": [], "errors": {}}, []
    kernel = jax.jit(quantize_kernel.quantize_rows_and_tiles)
    xla = jax.jit(lambda a, gs: (*quantize_blocks(a, (1, 128)), *grouped.quantize_wgrad(a, gs)))
    for name, m, d, g in SHAPES:
        r = np.random.RandomState(0)
        sizes = np.floor(r.dirichlet(np.full(g, 4.0)) * m).astype(np.int32) if g > 1 else np.array([m], np.int32)
        sizes[-1] += m - sizes.sum()
        gs = jnp.asarray(sizes)
        a = jnp.asarray(r.randn(m, d) * np.exp(r.randn(m, 1)), jnp.bfloat16)
        row = {"shape": name, "m": m, "d": d, "groups": g}
        try:
            got, want = kernel(a, gs), xla(a, gs)
            for label, x, y in zip(("q", "s", "qt", "st"), got, want):
                x, y = np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32))
                row[f"{label}_mismatch"] = float(np.mean(x != y))
                row[f"{label}_max_rel"] = float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30)))
            ok = row["s_mismatch"] == 0 and row["st_mismatch"] == 0 and row["q_max_rel"] <= 0.0625 and \
                row["qt_max_rel"] <= 0.0625 and row["q_mismatch"] < 1e-3 and row["qt_mismatch"] < 1e-3
            row["ok"] = bool(ok)
            if not ok:
                failed.append(name)
            p = got[2].shape[1]
            moved = 2 * m * d + m * d + d * p + 4 * (m * d // 128 + d * p // 128)
            for label, fn in (("kernel", kernel), ("xla", xla)):
                t = timed(fn, a, gs)
                row[f"{label}_ms"], row[f"{label}_gbs"] = t * 1e3, moved / t / 1e9
        except Exception as e:  # noqa: BLE001 — one failing shape does not stop the run
            res["errors"][name] = short_error(e)
            failed.append(name)
        res["rows"].append(row)
        print(f"{name:30s} {m}x{d}/{g}: ok={row.get('ok')}  q mismatch {row.get('q_mismatch', float('nan')):.1e} "
              f"qt {row.get('qt_mismatch', float('nan')):.1e}  kernel {row.get('kernel_ms', float('nan')):.3f} ms "
              f"({row.get('kernel_gbs', float('nan')):.0f} GB/s)  xla {row.get('xla_ms', float('nan')):.3f} ms", flush=True)
    weight_kernel = jax.jit(quantize_kernel.quantize_weight_blocks)
    weight_xla = jax.jit(lambda w: (quantize_blocks(w, (128, 128))[0], *quantize_blocks(w.transpose(0, 2, 1), (128, 128))))
    for name, shape in WEIGHTS:
        w = jnp.asarray(np.random.RandomState(1).randn(*shape), jnp.bfloat16)
        row = {"shape": name}
        try:
            q, qt, sc = weight_kernel(w)
            q_want, qt_want, st_want = weight_xla(w)
            bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint8))  # noqa: E731
            row["ok"] = bool(np.array_equal(bits(q), bits(q_want)) and np.array_equal(bits(qt), bits(qt_want))
                             and np.array_equal(np.asarray(sc), np.asarray(st_want).transpose(0, 2, 1)))
            if not row["ok"]:
                failed.append(name)
            moved = 2 * w.size + 2 * w.size + 4 * w.size // 128 ** 2
            for label, fn in (("kernel", weight_kernel), ("xla", weight_xla)):
                t = timed(fn, w)
                row[f"{label}_ms"], row[f"{label}_gbs"] = t * 1e3, moved / t / 1e9
        except Exception as e:  # noqa: BLE001
            res["errors"][name] = short_error(e)
            failed.append(name)
        res["rows"].append(row)
        print(f"{name:30s}: ok={row.get('ok')}  kernel {row.get('kernel_ms', float('nan')):.3f} ms "
              f"({row.get('kernel_gbs', float('nan')):.0f} GB/s)  xla {row.get('xla_ms', float('nan')):.3f} ms "
              f"({row.get('xla_gbs', float('nan')):.0f} GB/s)", flush=True)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "check_fp8_quantize.json"), "w") as f:
        json.dump(res, f, indent=2)
    report(res, failed)


if __name__ == "__main__":
    app.run(main)

"""Tile sweep (GPU) for the three Pallas grouped-GEMM kernels of `moe.grouped_gemm=pallas_mgpu`.

    python scripts/bench.py gmm_blocks [--tokens=16384] [--experts=64] [--topk=6] [--aligned]
        [--candidates=128.128.64.6.4,ws.128.128.64.3.8]

For the routed-expert GEMMs of a MoE layer — up/gate ([rows, D] x [E, D, F]) and down
([rows, F] x [E, F, D]) with rows = tokens · top-k spread unevenly over E experts — times the
forward, input-gradient and weight-gradient kernels of dsjax/model/grouped_gemm.py under several
tilings, next to a dense bf16 GEMM of the same FLOPs, and prints TFLOP/s per kernel and tiling;
the defaults in grouped_gemm.py come from this table. A candidate m.n.k.stages.grid_block_n is a
`Blocks` tiling of the one-warpgroup kernels (jax's, forked); ws.m.n.k.stages.grid_tile_width
is a `Tiles` of the warp-specialized kernels (model/grouped_gemm_kernel.py). Writes bench_gmm_blocks.json under
$OUT (when set) or --out.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TOKENS = flags.DEFINE_integer("tokens", 16384, "tokens per MoE layer call")
_EXPERTS = flags.DEFINE_integer("experts", 64, "routed experts")
_TOPK = flags.DEFINE_integer("topk", 6, "experts per token")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "model width D")
_FFN = flags.DEFINE_integer("ffn", 1408, "expert width F")
_REPEAT = flags.DEFINE_integer("repeat", 5, "timed calls after a warm-up")
_CANDIDATES = flags.DEFINE_list("candidates", [], "tilings m.n.k.stages.grid_block_n (one-warpgroup kernels) or "
                                "ws.m.n.k.stages.grid_tile_width (warp-specialized) to time (default: CANDIDATES)")
_ALIGNED = flags.DEFINE_boolean("aligned", False, "round every group's rows to a multiple of 128 (same total): "
                                "measures what tiles straddling two groups cost")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for bench_gmm_blocks.json")

# (m, n, k, stages, grid_block_n); invalid or SMEM-overflowing tilings are reported and skipped.
CANDIDATES = ("128.128.64.6.4", "ws.128.128.64.3.8", "ws.128.128.64.3.4", "ws.128.64.64.4.8", "ws.64.128.64.4.8")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dsjax.model import grouped_gemm as gg
    from dsjax.model import grouped_gemm_kernel as gk
    from dsjax.timing import seconds_per_call

    rows, e = _TOKENS.value * _TOPK.value, _EXPERTS.value
    r = np.random.RandomState(0)
    load = r.dirichlet(np.full(e, 4.0))  # uneven, no empty expert on average
    sizes = np.floor(load * rows).astype(np.int32)
    sizes[-1] += rows - sizes.sum()
    if _ALIGNED.value:  # each group a whole number of 128-row tiles; the rounding goes to the last
        sizes = sizes // 128 * 128
        sizes[-1] += rows - sizes.sum()
    candidates = _CANDIDATES.value or CANDIDATES
    sizes_G = jnp.asarray(sizes)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows, "experts": e,
              "aligned": _ALIGNED.value, "shapes": {}}
    for name, (k, n) in (("up", (_HIDDEN.value, _FFN.value)), ("down", (_FFN.value, _HIDDEN.value))):
        keys = jax.random.split(jax.random.key(1), 3)
        x_MK = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
        w_GKN = (jax.random.normal(keys[1], (e, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
        dy_MN = jax.random.normal(keys[2], (rows, n), jnp.bfloat16)
        flops = 2.0 * rows * k * n
        dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        dense_tflops = flops / seconds_per_call(dense, x_MK, w_GKN[0], repeat=_REPEAT.value) / 1e12
        rows_out = {"dense_tflops": dense_tflops, "kernels": {}}
        print(f"{name}: [{rows}, {k}] x [{e}, {k}, {n}]  dense bf16 {dense_tflops:.0f} TFLOP/s", flush=True)
        warp_specialized = {
            "forward": lambda x, w, gs, tiles: gk.m_grouped(x, w, gs, False, tiles),
            "input_grad": lambda dy, w, gs, tiles: gk.m_grouped(dy, w, gs, True, tiles),
            "weight_grad": lambda x, dy, gs, tiles: gk.k_grouped(x, dy, gs, tiles)}
        for kernel, fn, args in (
                ("forward", gg._mgpu_forward, (x_MK, w_GKN, sizes_G)),
                ("input_grad", gg._mgpu_input_grad, (dy_MN, w_GKN, sizes_G)),
                ("weight_grad", gg._mgpu_weight_grad, (x_MK, dy_MN, sizes_G))):
            cells, reference = {}, jax.jit(lambda *a, fn=fn: fn(*a, blocks=gg.Blocks()))(*args)
            for cand in candidates:
                family, *dims = cand.split(".") if cand.startswith("ws.") else ("one_wg", *cand.split("."))
                dims = tuple(int(v) for v in dims)
                try:
                    if family == "ws":
                        f = jax.jit(lambda *a, ws=warp_specialized[kernel], tiles=gk.Tiles(*dims): ws(*a, tiles))
                    else:
                        f = jax.jit(lambda *a, fn=fn, blocks=gg.Blocks(*dims): fn(*a, blocks=blocks))
                    tflops = flops / seconds_per_call(f, *args, repeat=_REPEAT.value) / 1e12
                    err = float(jnp.abs(f(*args).astype(jnp.float32) - reference).max() / jnp.abs(reference).max())
                    if err > 1e-2:  # both round to bf16 from f32 sums: ~4e-3 of the largest entry at most
                        raise ValueError(f"differs from the default one-warpgroup kernel by {err:.2e} (max-relative)")
                    cells[cand] = round(tflops, 1)
                except Exception as exc:  # an invalid tiling is a row of the table, not a crash
                    cells[cand] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
            best = max((v, c) for c, v in cells.items() if isinstance(v, float)) if any(
                isinstance(v, float) for v in cells.values()) else (0.0, "-")
            rows_out["kernels"][kernel] = {"tilings": cells, "best": best[1], "best_tflops": best[0]}
            print(f"  {kernel:12s} best {best[1]} {best[0]:.0f} TFLOP/s ({best[0] / dense_tflops:.2f}x dense)", flush=True)
            for cand, v in cells.items():
                print(f"      {cand:24s} {v if isinstance(v, str) else f'{v:.0f}'}", flush=True)
        result["shapes"][name] = rows_out
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "bench_gmm_blocks.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

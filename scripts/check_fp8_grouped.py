"""Check and time dsjax/fp8/grouped_kernel.py's FP8 grouped GEMMs on one Hopper GPU (one run, ~1-2 min).

    python scripts/check_fp8_grouped.py [--quick] [--only PREFIX] [--out DIR]     # on the GPU machine
    python scripts/check_fp8_grouped.py --only=small --configs=sweep              # tile-config sweep
    python scripts/check_fp8_grouped.py --only=small --alpha=1000                # near-equal expert loads
    python scripts/check_fp8_grouped.py --only=K-sweep --configs=128x128.m.4.4.lane   # per-tile cost
    python scripts/check_fp8_grouped.py --only=V3/EP64                             # 4 experts per GPU
    python scripts/check_fp8_grouped.py --cpu-interpret [--configs=...]           # dry run on CPU, jax >= 0.11

(a) Correctness, relative Frobenius error (~1e-4 with float32 outputs, ~7e-4 with bf16; FAIL above 2e-3):
    - the M-grouped kernel (forward, dgrad) and the K-grouped kernel (wgrad) vs grouped.py's XLA
      path (`_m_grouped` / `_k_grouped`, backend xla_gpu) on the same quantized operands, with
      Dirichlet-uneven groups, one empty expert, and an unaligned shape (M, K, N padded inside);
    - gmm_block(..., "pallas_gpu") vs gmm_block(..., "xla_gpu"): y, dx, dw (f32 operands), and that
      the compiled fwd+bwd HLO holds three Mosaic GPU custom calls;
    - at every timed shape (b), every FP8 kernel's output on four of its groups (first, last,
      largest, one between) vs dequantize-then-float32 products of those groups alone
      (`sampled_groups_error`, `sampled_wgrad_error`): faults that depend on size (offsets past
      2^31) show only there.
(b) Speed, TFLOP/s (2MKN / median time of back-to-back calls, every GEMM of a shape timed in turn
    per round: check_common.interleaved), bf16 outputs: the FP8 kernels on
    pre-quantized operands vs the bf16 Pallas grouped kernels (grouped_gemm.MGPU: forward,
    input_grad, weight_grad) and a dense bf16 jnp.dot of the same FLOPs, on configs/small.py's
    expert GEMMs (98,304 rows over 64 experts, 2048 -> 1408 and 1408 -> 2048) and DeepSeek-V3's
    (131,072 rows over 256 experts, 7168 -> 2048 and 2048 -> 7168); then fwd+bwd (quantization
    included, bf16 x and w) of gmm_block pallas_gpu vs grouped_gemm.gmm(kind="pallas_mgpu").
    Each FP8 kernel runs in two tile configs: grouped_kernel's defaults (M_GROUPED, K_GROUPED: 4
    stages; the M-grouped tiles chained, Warpgroup semantics, 64-tile snake bands; K_GROUPED Lane
    semantics, 4-tile bands) and "wg" (3 stages, 8-tile snake, Warpgroup semantics: kernel.py's BLOCKED, the
    dense kernel's best forward/dgrad config on H200); the better one should become the default.
    The K-grouped kernel's bf16 column is what gmm_block runs with bf16 weights; "wgrad f32" is its
    float32 output (f32 master weights), which at 256 experts is bound by writing dw.
--configs=SPEC,SPEC,... (or "sweep": grouped_kernel.SWEEP_CONFIGS) replaces those two by candidate
tile configs in kernel.Config.parse's compact spec, CTA_MxCTA_N[.m|n[.stages[.grid_tile_width
[.lane|wg[.kC][.c]]]]] (e.g. 128x192.m.3.8.wg; 128x128.m.2.4.lane.k2: two 128-K chunks per step;
128x128.m.4.4.lane.c: chained tiles; these two M-grouped only, so no wgrad for them; omitted fields
keep kernel.Config's defaults), each checked
(grouped_kernel.check_config) before anything runs. Each candidate is checked for correctness on the
"unaligned" shape (M, K and N padded; a 192-column tile straddles scale blocks; float32 output where
its output tile fits shared memory, and bf16 against the reference rounded to bf16 — the M-grouped
kernel's swizzled full-slice stores run with bf16 only) and timed for
forward, dgrad and wgrad on every timed shape, next to the bf16 kernels; the run ends with the best
candidate per kernel and shape and over all timed shapes (least total time; candidates that failed a
check or a shape excluded). The gmm_block check, "wgrad fp8 f32" and the fwd+bwd timings (library
defaults, not the candidates) are skipped. Cost: ~9 compiles per candidate with two timed shapes.
Every compile is guarded, so one failure does not stop the run; errors are listed at the end.
Writes fp8_grouped.json under $OUT (or --out) after each section.
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

# name -> (M rows, K, N, G experts): each expert GEMM as [M, K] x [G, K, N].
SHAPES = {
    "small up/gate": (98_304, 2048, 1408, 64),
    "small down": (98_304, 1408, 2048, 64),
    "small gate|up": (98_304, 2048, 2816, 64),  # what fp8=block runs: one GEMM over [w_gate | w_up]
    "V3 up/gate": (131_072, 7168, 2048, 256),
    "V3 down": (131_072, 2048, 7168, 256),
}
# Timed only on request (--only="K-sweep"): V3's down GEMM at four depths, so time = tiles x (a + b K)
# separates a per-output-tile cost a from the per-128-K step cost b (the FP8 kernels fall short at
# K = 2048, not at 7168).
K_SWEEP = {f"K-sweep {k}": (131_072, k, 7168, 256) for k in (1024, 2048, 4096, 7168)}
# Timed only on request (--only="V3/EP64"): V3's expert GEMMs as one GPU of its 64-way expert
# parallelism runs them (paper §3.4: 4 experts per GPU), ~8,192 rows each as in DeepGEMM's grouped
# benchmark (4 x 8192): each expert's weights serve 64 row tiles instead of the 4 of 512 rows.
EP_SHAPES = {"V3/EP64 up/gate": (32_768, 7168, 2048, 4), "V3/EP64 down": (32_768, 2048, 7168, 4)}
CHECKS = {"aligned": (4096, 1024, 768, 8), "unaligned": (1000, 1000, 200, 5)}
LAYER_SHAPES = ("small up/gate", "V3 up/gate")
DIRICHLET_ALPHA = 2.0  # uneven expert loads (--alpha; large values approach a balanced router's equal loads)
TOL = 2e-3


def group_sizes(m: int, g: int, seed: int, empty: int | None = None, alpha: float = DIRICHLET_ALPHA):
    """Dirichlet(alpha)-uneven sizes summing to m (largest remainder), expert `empty` given no rows."""
    import numpy as np
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(g, alpha))
    if empty is not None:
        p[empty] = 0.0
        p /= p.sum()
    raw = p * m
    sizes = np.floor(raw).astype(np.int64)
    sizes[np.argsort(raw - sizes)[::-1][: m - sizes.sum()]] += 1
    return sizes.astype(np.int32)


def raw(M, K, N, G, seed=0, dtype=None, empty=None, alpha=DIRICHLET_ALPHA):
    """x [M, K] (rows of varying scale), w [G, K, N], dy [M, N] in `dtype` (default float32) and
    Dirichlet(alpha) group sizes (expert `empty` given none)."""
    import jax
    import jax.numpy as jnp
    kx, kw, ks, kd = jax.random.split(jax.random.key(seed), 4)
    dtype = dtype or jnp.float32
    x = (jax.random.normal(kx, (M, K)) * jnp.exp(jax.random.normal(ks, (M, 1)))).astype(dtype)
    w = (jax.random.normal(kw, (G, K, N)) * 0.05).astype(dtype)
    dy = jax.random.normal(kd, (M, N)).astype(dtype)
    return x, w, dy, jnp.asarray(group_sizes(M, G, seed, empty, alpha))


def quantized(x, w, dy, gs):
    """The FP8 operands of the three GEMMs (fwd, dgrad: a, sa, b, sb; wgrad: a, sa, b, sb), laid out
    as gmm_block's custom_vjp builds them."""
    return _quantize_fn()(x, w, dy, gs)


SAMPLED_GROUPS = 4


def sampled_groups_error(y_MN, qa_MK, sa_MJ, qb_GNK, sb_GJN, group_sizes_G) -> float:
    """Relative Frobenius error of an M-grouped kernel's output on SAMPLED_GROUPS of its groups (the
    first and last with rows, the largest, one between) against dequantize-then-float32 products of
    those groups alone, rounded to y's dtype: grouped.py's XLA path would lower to one dense product
    over every group on the GPU (G times the FLOPs), too slow at V3's 256 experts."""
    import numpy as np

    sizes = np.asarray(group_sizes_G)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pairs = []
    for g in _sampled(sizes):
        rows = slice(int(starts[g]), int(starts[g] + sizes[g]))
        # sb is per chunk and column, i.e. per 128-K chunk of each row of b [N, K]
        pairs.append((y_MN[rows], (qa_MK[rows], sa_MJ[rows]), (qb_GNK[g], sb_GJN[g].T)))
    return _products_error(pairs)


def _sampled(counts) -> list[int]:
    """Up to SAMPLED_GROUPS groups with work: the first and last, the largest, one between."""
    import numpy as np

    counts = np.asarray(counts)
    full = np.flatnonzero(counts)
    picks = {int(full[0]), int(full[-1]), int(np.argmax(counts)), int(full[len(full) // 2])}
    return sorted(picks)[:SAMPLED_GROUPS]


def sampled_wgrad_error(dw_GKN, qa_KP, sa_KT, qb_NP, sb_NT, tile_start_G, tiles_G) -> float:
    """The K-grouped (wgrad) kernel's `sampled_groups_error`: dw[g] on a few groups against the
    dequantize-then-float32 product of that group's 128-row tiles alone."""
    import numpy as np

    start, count = np.asarray(tile_start_G), np.asarray(tiles_G)
    pairs = []
    for g in _sampled(count):
        tiles = slice(int(start[g]), int(start[g] + count[g]))
        cols = slice(tiles.start * 128, tiles.stop * 128)
        pairs.append((dw_GKN[g], (qa_KP[:, cols], sa_KT[:, tiles]), (qb_NP[:, cols], sb_NT[:, tiles])))
    return _products_error(pairs)


def _products_error(pairs) -> float:
    """Relative Frobenius error over [(got [R, C], (qa [R, K], sa), (qb [C, K], sb))] of got against
    dequantize_blocks(qa) @ dequantize_blocks(qb)^T (1x128 tiles along K) in float32, rounded to
    got's dtype."""
    import jax
    import jax.numpy as jnp

    from dsjax.fp8.quantize import dequantize_blocks

    num = den = 0.0
    for got, (qa, sa), (qb, sb) in pairs:
        a, b = dequantize_blocks(qa, sa, (1, 128)), dequantize_blocks(qb, sb, (1, 128))
        want = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST).astype(got.dtype).astype(jnp.float32)
        num += float(jnp.sum(jnp.square(got.astype(jnp.float32) - want)))
        den += float(jnp.sum(jnp.square(want)))
    return (num / max(den, 1e-30)) ** 0.5


@functools.cache
def _quantize_fn():
    import jax
    from dsjax.fp8 import grouped as GR
    from dsjax.fp8.quantize import quantize_blocks

    @jax.jit
    def build(x, w, dy, gs):
        K, N = w.shape[1:]
        qx, sx = quantize_blocks(x, (1, 128))
        qw, sw = quantize_blocks(w, (128, 128))
        qdy, sdy = quantize_blocks(dy, (1, 128))
        fwd = (qx, sx, qw.transpose(0, 2, 1), GR._per_column(sw, N))
        dgrad = (qdy, sdy, qw, GR._per_column(sw.transpose(0, 2, 1), K))
        wgrad = (*GR.quantize_wgrad(x, gs), *GR.quantize_wgrad(dy, gs))
        return fwd, dgrad, wgrad

    return build


def k_config(GK, cfg):
    """The K-grouped (wgrad) kernel's config for candidate `cfg`: the library's K_GROUPED beside its
    M_GROUPED, None for M-grouped-only options (k_chunks > 1, chain), else `cfg` itself."""
    if cfg is GK.M_GROUPED:
        return GK.K_GROUPED
    return None if cfg.m_grouped_only else cfg


def best_configs(res: dict, configs: dict, kernels, check_gemm: dict) -> dict:
    """{kernel: {"per_shape": {shape: [spec, TFLOP/s]}, "overall": spec or None}} over the candidates
    (column suffix -> config) whose checks of that kernel (res["checks"], `check_gemm[kernel]` names)
    all passed; "overall" has the least total time over the timed shapes (res["tflops"]), among the
    candidates timed on every one."""
    out = {}
    for k in kernels:
        passed = [suffix for suffix in configs
                  if all(err is not None and err < TOL for name, err in res["checks"].items()
                         if name.startswith(f"{check_gemm[k]}{suffix} "))]
        per_shape, total = {}, dict.fromkeys(passed, 0.0)
        for sname, row in res["tflops"].items():
            M, K, N, _ = row["shape"]
            timed_here = {suffix: row[f"{k} fp8{suffix}"] for suffix in passed if row.get(f"{k} fp8{suffix}")}
            if timed_here:
                suffix = max(timed_here, key=timed_here.get)
                per_shape[sname] = [suffix.strip(), timed_here[suffix]]
            for suffix in list(total):
                if suffix in timed_here:
                    total[suffix] += 2.0 * M * K * N / timed_here[suffix]
                else:
                    del total[suffix]
        out[k] = {"per_shape": per_shape, "overall": min(total, key=total.get).strip() if total else None}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="small.py's shapes only, no fwd+bwd timing")
    parser.add_argument("--only", default="", help="time only the shapes whose names start with this (e.g. V3)")
    parser.add_argument("--configs", default="",
                        help="sweep: comma-separated tile configs CTA_MxCTA_N[.m|n[.stages[.grid_tile_width"
                             "[.lane|wg[.kC]]]]] (e.g. 128x192.m.3.8.wg), or 'sweep' for grouped_kernel.SWEEP_CONFIGS")
    parser.add_argument("--alpha", type=float, default=DIRICHLET_ALPHA,
                        help="Dirichlet concentration of the timed shapes' expert loads (checks keep the default)")
    parser.add_argument("--cpu-interpret", action="store_true",
                        help="dry run on CPU (jax >= 0.11): tiny shapes, the FP8 kernels in Pallas's Mosaic GPU "
                             "interpreter, xla_cpu references, no bf16 Pallas kernels; timings meaningless")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # partial output survives a timeout

    if args.cpu_interpret:  # its warpgroup threads hung on one CPU device (jax 0.11.2); tests use 8
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsjax.fp8 import grouped as GR
    from dsjax.fp8 import grouped_kernel as GK
    from dsjax.model import grouped_gemm

    ref_backend, shapes, checks, layer_shapes = "xla_gpu", SHAPES, CHECKS, LAYER_SHAPES
    bf16_kernels = True
    sweep = bool(args.configs)
    if sweep:  # column suffix -> config; the checks each runs
        specs = GK.SWEEP_CONFIGS if args.configs == "sweep" else [v.strip() for v in args.configs.split(",")]
        configs = {}
        for spec in specs:
            try:
                cfg = GK.Config.parse(spec)
                for sb_blocked in (True,) if cfg.m_grouped_only else (True, False):  # k_chunks, chain: M-grouped only
                    GK.check_config(cfg, jnp.bfloat16, sb_blocked)
            except ValueError as e:
                parser.error(f"--configs {spec}: {e}")
            configs[f" {cfg.spec}"] = cfg
        config_checks = dict.fromkeys(configs, ("unaligned",))
    else:
        configs = {"": GK.M_GROUPED, " wg": GK.Config(stages=3, grid_tile_width=8, semantics="warpgroup")}
        config_checks = {"": tuple(CHECKS), " wg": ("aligned",)}
    if args.cpu_interpret:
        from dsjax.fp8 import interpret
        interpret.use_interpreters()  # every FP8 kernel interpreted; the pallas_gpu check passes (dry run only)
        ref_backend, bf16_kernels = "xla_cpu", False
        shapes = {"tiny up": (600, 256, 384, 4), "tiny down": (600, 384, 256, 4)}
        checks = {"aligned": (330, 256, 256, 4), "unaligned": (300, 200, 136, 3)}
        layer_shapes = ("tiny up",)
    if args.quick or sweep:
        layer_shapes = ()
    if args.quick:
        shapes = {k: v for k, v in shapes.items() if k.startswith("small")}
    if args.only:
        shapes = {k: v for k, v in {**shapes, **K_SWEEP, **EP_SHAPES}.items() if k.startswith(args.only)}
        layer_shapes = tuple(k for k in layer_shapes if k.startswith(args.only))

    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "jax": jax.__version__, "dirichlet_alpha": args.alpha,
           "kernel_configs": {k.strip() or "default": repr(v) for k, v in configs.items()}, "checks": {}, "tflops": {},
           "layer_fwd_bwd_ms": {}, "errors": {}}
    print(f"{dev.device_kind}, jax {jax.__version__}, {getattr(dev, 'core_count', '?')} SMs")
    res["gpu_state"] = {"start": gpu_state()}
    print(f"GPU at start: {res['gpu_state']['start']}")
    failed = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fp8_grouped.json")

    def save():
        res["failed"] = failed
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    m_ref = jax.jit(lambda *a: GR._m_grouped(*a, ref_backend, jnp.float32))
    k_ref = jax.jit(lambda *a: GR._k_grouped(*a, ref_backend, jnp.float32))

    def record(name, err):
        ok = err is not None and err < TOL
        res["checks"][name] = err
        if not ok:
            failed.append(name)
        print(f"  {'ok  ' if ok else 'FAIL'} {name:52s} rel err {err:.2e}" if err is not None
              else f"  FAIL {name}")

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - report and continue
            res["errors"][name] = short_error(e)
            print(f"  error {name}: " + short_error(e))
            return None

    def tile_args(gs):
        _, tile_start, tiles = GR.group_tiles(gs, 0)
        return tile_start, tiles

    # ---- (a) correctness ----------------------------------------------------------------------
    print(f"(a) correctness: relative Frobenius error vs grouped.py's {ref_backend} path (same quantized operands)")
    for cname, (M, K, N, G) in checks.items():
        checked = {suffix: cfg for suffix, cfg in configs.items() if cname in config_checks[suffix]}
        if not checked:
            continue
        x, w, dy, gs = raw(M, K, N, G, seed=1, empty=1)
        print(f"  {cname} {M}x{K}x{N}, G={G}, group sizes {gs.tolist()}")
        fwd, dgrad, wgrad = quantized(x, w, dy, gs)
        gemms = {"forward": (fwd, True), "dgrad": (dgrad, True), "wgrad": (wgrad, False)}
        want = {"forward": m_ref(*fwd, gs), "dgrad": m_ref(*dgrad, gs), "wgrad": k_ref(*wgrad, gs)}
        for suffix, cfg in checked.items():
            # float32 output where its tile fits shared memory, and bf16 (vs the reference in bf16):
            # the M-grouped kernel stores whole warpgroup slices from a second, swizzled buffer where
            # that fits, which with bf16 it does and with float32 it does not
            outs = [jnp.float32] if cfg.smem_bytes(jnp.float32) <= GK.SMEM_LIMIT else []
            outs.append(jnp.bfloat16)
            for gemm, (args_, m_grouped) in gemms.items():
                if not m_grouped and k_config(GK, cfg) is None:
                    continue  # the K-grouped kernel takes one chunk per step, unchained
                for out in outs if m_grouped else outs[:1]:
                    name = f"{gemm}{suffix} {cname}" + ("" if out == jnp.float32 else " (bf16 out)")
                    if m_grouped:
                        fn = jax.jit(lambda *a, out=out: GK.m_grouped_matmul(*a, out, cfg, sb_blocked=True))
                        got = guarded(name, lambda: fn(*args_, gs))
                    else:
                        fn = jax.jit(lambda *a, out=out: GK.k_grouped_matmul(*a, out, k_config(GK, cfg)))
                        got = guarded(name, lambda: fn(*args_, *tile_args(gs)))
                    record(name, None if got is None else rel(got, want[gemm].astype(out)))

    M, K, N, G = checks["aligned"]
    x, w, dy, gs = raw(M, K, N, G, seed=2, empty=0)

    def fwd_bwd(backend):
        def f(x, w):
            y, vjp = jax.vjp(lambda x, w: GR.gmm_block(x, w, gs, backend), x, w)
            return (y, *vjp(dy))
        return jax.jit(f)

    def check_gmm_block():
        want = fwd_bwd(ref_backend)(x, w)
        f_pallas = fwd_bwd("pallas_gpu")
        hlo = f_pallas.lower(x, w).compile().as_text()
        n_calls = len(re.findall(r'custom_call_target="mosaic_gpu', hlo))
        for nm, g, r in zip(("y", "dx", "dw"), f_pallas(x, w), want):
            record(f"gmm_block pallas_gpu vs {ref_backend} {nm}", rel(g, r))
        if not args.cpu_interpret:  # the interpreter leaves no Mosaic GPU custom call
            print(f"  {'ok  ' if n_calls == 3 else 'FAIL'} compiled fwd+bwd HLO: {n_calls} Mosaic GPU calls (want 3)")
            res["checks"]["gmm_block mosaic_gpu calls"] = n_calls
            if n_calls != 3:
                failed.append("gmm_block mosaic_gpu calls")

    if not sweep and guarded("gmm_block", check_gmm_block) is None and "gmm_block" in res["errors"]:
        failed.append("gmm_block")
    save()

    # ---- (b) speed ----------------------------------------------------------------------------
    print("(b) TFLOP/s (2MKN / median time; FP8 kernels on pre-quantized operands; bf16 out unless noted)")
    kernels = ("fwd", "dgrad", "wgrad")
    if sweep:  # the bf16 baselines in the shape's row, then one line per candidate
        cols = ("dense bf16", "fwd bf16", "dgrad bf16", "wgrad bf16")
    else:
        cols = ("dense bf16", "fwd bf16", "fwd fp8", "fwd fp8 wg", "dgrad bf16", "dgrad fp8", "dgrad fp8 wg",
                "wgrad bf16", "wgrad fp8", "wgrad fp8 wg", "wgrad fp8 f32")
    print(f"  {'shape':>14s} {'M x K x N / G':>22s} " + " ".join(f"{c:>13s}" for c in cols))

    def fmt(v, wd=13):
        return f"{v:{wd}.0f}" if v is not None else "-".rjust(wd)

    def candidate_line(suffix, row):
        """'  fwd 812 (1.41x) ...': a candidate's TFLOP/s per kernel and its ratio to the bf16 kernel."""
        parts = []
        for k in kernels:
            v, b = row.get(f"{k} fp8{suffix}"), row.get(f"{k} bf16")
            parts.append(f"{k} {fmt(v, 5)}" + (f" ({v / b:4.2f}x)" if v is not None and b else " " * 8))
        return f"    {suffix.strip():>22s}  " + "  ".join(parts)

    for sname, (M, K, N, G) in shapes.items():
        fns = {}
        x, w, dy, gs = raw(M, K, N, G, seed=3, dtype=jnp.bfloat16, alpha=args.alpha)
        fwd, dgrad, wgrad = jax.block_until_ready(quantized(x, w, dy, gs))
        tiles = jax.block_until_ready(tile_args(gs))

        def bench(col, fn, *a):
            """Compiled and run now (a failure is recorded, not fatal), timed below. The FP8 kernels'
            outputs are also checked at this, the timed, shape, on a few of its groups
            (`sampled_groups_error`, `sampled_wgrad_error`): the checks above run small shapes only,
            and a fault may depend on size (offsets past 2^31; V3's expert weights are 3.8e9 bytes)."""
            y = guarded(f"{col} {sname}", lambda: jax.block_until_ready(fn(*a)))
            if y is None:
                return
            fns[col] = (fn, a)
            if col.startswith(("fwd fp8", "dgrad fp8", "wgrad fp8")):
                check = sampled_wgrad_error if col.startswith("wgrad") else sampled_groups_error
                err = guarded(f"{col} {sname} groups check", lambda: check(y, *a))
                record(f"{col} {sname} (timed shape, {SAMPLED_GROUPS} groups)", err)

        bench("dense bf16", jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)), x, w[0])
        if bf16_kernels:
            bench("fwd bf16", jax.jit(grouped_gemm.MGPU.forward), x, w, gs)
            bench("dgrad bf16", jax.jit(grouped_gemm.MGPU.input_grad), dy, w, gs)
            bench("wgrad bf16", jax.jit(grouped_gemm.MGPU.weight_grad), x, dy, gs)
        for suffix, cfg in configs.items():
            m_grouped = jax.jit(functools.partial(GK.m_grouped_matmul, out_dtype=jnp.bfloat16, config=cfg,
                                                  sb_blocked=True))
            bench(f"fwd fp8{suffix}", m_grouped, *fwd, gs)
            bench(f"dgrad fp8{suffix}", m_grouped, *dgrad, gs)
            if k_config(GK, cfg) is not None:
                bench(f"wgrad fp8{suffix}", jax.jit(functools.partial(GK.k_grouped_matmul, out_dtype=jnp.bfloat16,
                                                                     config=k_config(GK, cfg))), *wgrad, *tiles)
        if not sweep:
            bench("wgrad fp8 f32", jax.jit(functools.partial(GK.k_grouped_matmul, out_dtype=jnp.float32)),
                  *wgrad, *tiles)
        # round-robin, so that drift between calls moves every kernel alike
        rounds, calls = (1, 1) if args.cpu_interpret else (3, 5) if M * K * N > 1e12 else (5, 10)
        times = interleaved(fns, rounds, calls, load_s=0.0 if args.cpu_interpret else 3.0) if fns else {}
        row = {col: 2.0 * M * K * N / statistics.median(t) / 1e12 for col, t in times.items()}
        res["tflops"][sname] = {"shape": [M, K, N, G], **row}
        save()
        print(f"  {sname:>14s} {f'{M}x{K}x{N} / {G}':>22s} " + " ".join(fmt(row.get(c)) for c in cols))
        if sweep:
            for suffix in configs:
                print(candidate_line(suffix, row))

    if sweep:
        res["best"] = best_configs(res, configs, kernels, {"fwd": "forward", "dgrad": "dgrad", "wgrad": "wgrad"})
        print("best candidate per kernel (TFLOP/s; overall: least total time over the timed shapes, "
              "candidates that passed their checks)")
        for k, best in res["best"].items():
            per_shape = " | ".join(f"{sname} {spec} {v:.0f}" for sname, (spec, v) in best["per_shape"].items())
            print(f"  {k:>5s}: {per_shape} | overall {best['overall']}")
        save()

    # fwd + both grads, quantization included, bf16 x and w (dx, dw in bf16).
    for sname in layer_shapes:
        M, K, N, G = shapes[sname]
        x, w, _, gs = raw(M, K, N, G, seed=4, dtype=jnp.bfloat16)
        layer = {}
        gemms = {"fp8 gmm_block pallas_gpu": lambda x, w: GR.gmm_block(x, w, gs, "pallas_gpu")}
        if bf16_kernels:
            gemms["bf16 gmm pallas_mgpu"] = lambda x, w: grouped_gemm.gmm(x, w, gs, "pallas_mgpu", jnp.bfloat16)
        for label, gemm in gemms.items():
            n = 1 if args.cpu_interpret else 3
            layer[label] = guarded(f"layer {label} {sname}", lambda gemm=gemm: fwd_bwd_ms(gemm, x, w, n))
        res["layer_fwd_bwd_ms"][sname] = {"shape": [M, K, N, G], **layer}
        save()
        print(f"  fwd+bwd {sname} {M}x{K}x{N} / {G} (ms): " + ms_line(layer))

    res["gpu_state"]["end"] = gpu_state()
    print(f"GPU at end: {res['gpu_state']['end']}")
    save()
    report(res, failed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

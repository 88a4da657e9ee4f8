"""One call of each GEMM kernel, for Nsight Compute: where a kernel's cycles go, not how fast it is.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis python scripts/ncu_fp8.py [--kernels=dense,m_grouped,bf16_grouped]
    python scripts/ncu_fp8.py --cpu-interpret      # dry run on CPU (jax >= 0.11): tiny shapes, interpreted

Timing says the FP8 kernels run their 128-K steps at 42-47% of FP8 peak at K = 2048 (dense), and
still at 46-54% with the promotion taken out (BENCHMARKS.md, FP8, eleventh session); the bf16
grouped kernel runs at 65-68% of bf16 peak. Nsight Compute's warp-state and scheduler sections say
why (KINDS.md: it reads the counters on the Firecracker machines; `--clock-control none` leaves
the clocks alone, as METHOD.md asks). The kernels:
  dense         kernel.block_scaled_matmul (its sb-blocked default), M x K x N (--dense)
  m_grouped     grouped_kernel.m_grouped_matmul (M_GROUPED), rows over G experts (--grouped)
  bf16_grouped  the bf16 warp-specialized grouped forward (grouped_gemm.MGPU) on the same shape
Operands are made on the host (numpy, ml_dtypes) and copied over, so the launches ncu sees are
the kernels themselves plus the few small layout ops their wrappers run (a transpose of sa, the
grouped tile schedule). Each kernel is called once: the Mosaic GPU kernels are the long launches
in the report; they are listed here in call order.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from check_common import gpu_state  # noqa: E402  (scripts/ is on sys.path when run)
from check_fp8_grouped import group_sizes  # noqa: E402

KERNELS = ("dense", "m_grouped", "bf16_grouped")


def host_operands(rng, M, K, N, G=None):
    """x fp8 [M, K] with its 1x128 scales, w fp8 [N, K] (or [G, N, K]) with per-column scales
    constant over 128-column blocks, and bf16 x, w [K, N] (or [G, K, N]) for the bf16 kernel: numpy
    arrays (values in E4M3's range; the kernels' speed does not depend on them)."""
    import ml_dtypes
    import numpy as np

    j = -(-K // 128)
    lead = () if G is None else (G,)
    x = rng.standard_normal((M, K), np.float32)
    w = rng.standard_normal((*lead, N, K), np.float32) * 0.05
    qa, qb = x.astype(ml_dtypes.float8_e4m3fn), w.astype(ml_dtypes.float8_e4m3fn)
    sa = rng.uniform(0.5, 1.5, (M, j)).astype(np.float32)
    sb = np.repeat(rng.uniform(0.5, 1.5, (*lead, j, -(-N // 128))).astype(np.float32), 128, axis=-1)[..., :N]
    return qa, sa, qb, sb, x.astype(ml_dtypes.bfloat16), np.swapaxes(w, -1, -2).astype(ml_dtypes.bfloat16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {KERNELS}")
    parser.add_argument("--dense", default="4096,2048,7168", help="M,K,N of the dense kernel")
    parser.add_argument("--grouped", default="32768,2048,7168,4",
                        help="M,K,N,G of the grouped kernels (default: V3's down forward on one GPU of its "
                             "64-way expert parallelism; Dirichlet(2)-uneven groups)")
    parser.add_argument("--cpu-interpret", action="store_true", help="dry run on CPU, tiny shapes")
    args = parser.parse_args()
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if unknown := set(kernels) - set(KERNELS):
        parser.error(f"--kernels: {sorted(unknown)} not in {KERNELS}")
    dense = tuple(int(v) for v in args.dense.split(","))
    grouped = tuple(int(v) for v in args.grouped.split(","))
    if len(dense) != 3 or len(grouped) != 4:
        parser.error("--dense takes M,K,N and --grouped M,K,N,G")

    extra = {}
    if args.cpu_interpret:
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
        dense, grouped = (256, 384, 256), (300, 256, 256, 3)
        kernels = [k for k in kernels if k != "bf16_grouped"]  # a Pallas kernel with no interpreter here
    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.cpu_interpret:
        from jax.experimental.pallas import mosaic_gpu as plgpu
        extra = dict(interpret=plgpu.InterpretGPUParams(), num_ctas=2)
    from dsjax.fp8 import grouped_kernel, kernel
    from dsjax.model import grouped_gemm

    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; GPU: {gpu_state()}", flush=True)
    rng = np.random.default_rng(0)
    calls = []
    if "dense" in kernels:
        qa, sa, qb, sb, _, _ = (jnp.asarray(a) for a in host_operands(rng, *dense))
        fn = jax.jit(lambda *a: kernel.block_scaled_matmul(*a, jnp.bfloat16, sb_blocked=True, **extra))
        calls.append((f"dense {'x'.join(map(str, dense))}", fn, (qa, sa, qb, sb)))
    if {"m_grouped", "bf16_grouped"} & set(kernels):
        M, K, N, G = grouped
        gs = jnp.asarray(group_sizes(M, G, seed=3))
        qa, sa, qb, sb, x, w = (jnp.asarray(a) for a in host_operands(rng, M, K, N, G))
        if "m_grouped" in kernels:
            fn = jax.jit(lambda *a: grouped_kernel.m_grouped_matmul(*a, jnp.bfloat16, sb_blocked=True, **extra))
            calls.append((f"m_grouped {M}x{K}x{N} / {G}", fn, (qa, sa, qb, sb, gs)))
        if "bf16_grouped" in kernels:
            calls.append((f"bf16_grouped {M}x{K}x{N} / {G}", jax.jit(grouped_gemm.MGPU.forward), (x, w, gs)))
    outputs = []
    for name, fn, operands in calls:
        compiled = fn.lower(*operands).compile()  # compiling launches nothing on the GPU
        outputs.append(jax.block_until_ready(compiled(*operands)))
        print(f"called {name}", flush=True)
    print(f"GPU: {gpu_state()}", flush=True)
    for (name, _, _), y in zip(calls, outputs):  # after the profiled calls: these launch kernels too
        print(f"{name}: output {y.shape} {y.dtype}, all finite {bool(jnp.isfinite(y.astype(jnp.float32)).all())}")


if __name__ == "__main__":
    main()

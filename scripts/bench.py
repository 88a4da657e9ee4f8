"""Benchmarks (GPU): `python scripts/bench.py NAME [flags]` runs scripts/bench_NAME.py.

    train   train-step tokens/s and MFU of a config, and where the step's time goes
    moe     grouped-GEMM and MoE-layer TFLOP/s, expert-parallel all-to-all variants
    decode  absorbed latent-cache vs expanded-cache decode, MTP speculative decoding
    decode_attention  the flash-decoding kernel alone vs XLA's absorbed attention
    gmm_blocks  tile sweep of the Pallas grouped-GEMM kernels
    hf      side by side with transformers (PyTorch): train step and batched generation
    scaling train-step tokens/s per device on several meshes (multi-GPU scaling efficiency)
    profile device time by XLA op of the train step and of batched generation

Each prints a table and writes JSON under $OUT (when set) or --out.
"""

import os
import runpy
import sys

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    name = sys.argv.pop(1)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"bench_{name}.py")
    if not os.path.exists(path):
        sys.exit(f"unknown benchmark {name!r}; see scripts/bench_*.py")
    sys.argv[0] = path
    runpy.run_path(path, run_name="__main__")

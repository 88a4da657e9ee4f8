"""What the one-run GPU check scripts (scripts/check_*.py, ab_fp8_grouped.py) share: timing kernel
calls (alone, or interleaved round-robin), recording the GPU's clocks and power beside the timings,
and reporting a failed compile compactly, so that one failing config does not stop the run."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import traceback


GPU_FIELDS = "name,serial,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"


def gpu_state() -> str:
    """One line per GPU of `nvidia-smi --query-gpu=GPU_FIELDS` (the machine and its clocks and power
    now), or why there is none: the same GEMM has timed 589 and 729 TFLOP/s in two calls, so every
    timing run records what it ran on, at its start and its end."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi: {type(e).__name__}: {e}"
    return (out.stdout if out.returncode == 0 else f"nvidia-smi exit {out.returncode}: {out.stderr}").strip()


def short_error(e: BaseException) -> str:
    """The exception and the last few frames, compactly (first 6 lines of the message)."""
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
    msg = "\n      ".join(str(e).strip().splitlines()[:6])
    return f"{type(e).__name__}: {msg}\n      at {where}"


def timed(fn, *args, inner=10, outer=5):
    """Median over `outer` repetitions of (time of `inner` back-to-back calls) / inner, in seconds."""
    import jax
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(outer):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def interleaved(fns: dict, rounds: int = 7, calls: int = 20, load_s: float = 3.0) -> dict:
    """{name: [seconds per call, one per round]} for {name: (fn, args)}, compiled already: after
    `load_s` of the first fn (clocks and power settle under load), each round times `calls`
    back-to-back calls of each fn in turn, so drift between processes and calls (the same bf16 GEMM
    has timed ±8% apart in runs minutes apart) moves every fn alike."""
    import jax

    def run(fn, args):
        out = None
        for _ in range(calls):
            out = fn(*args)
        return jax.block_until_ready(out)

    first = next(iter(fns.values()))
    t_end = time.perf_counter() + load_s
    while time.perf_counter() < t_end:
        run(*first)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            run(fn, args)
            times[name].append((time.perf_counter() - t0) / calls)
    return times


def fwd_bwd_ms(gemm, x, w, repeat: int = 3) -> float:
    """Milliseconds of one forward + both gradients of `gemm(x, w)` (`timed`, repeat x repeat),
    through a loss that needs y, so that the forward GEMM is not dead code (as it is for sum(y))."""
    import jax
    import jax.numpy as jnp
    f = jax.jit(jax.value_and_grad(lambda x, w: jnp.square(gemm(x, w).astype(jnp.float32)).sum(), argnums=(0, 1)))
    return timed(f, x, w, inner=repeat, outer=repeat) * 1e3


def ms_line(times: dict) -> str:
    """'label 1.23, other -' for {label: milliseconds or None (failed)}."""
    return ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in times.items())


def report(res: dict, failed: list) -> None:
    """The compact error list (res["errors"]) and the one RESULT line a run ends with."""
    if res["errors"]:
        print(f"errors ({len(res['errors'])}):")
        for k, v in res["errors"].items():
            print(f"  {k}: {v}")
    print("RESULT: " + ("all checks passed" if not failed else f"FAILED {failed}"))

"""The XLA options dsjax compiles its training steps with (`jax.jit(..., compiler_options=TRAINING)`).

A layer scan's backward pass reads the forward's residuals, which jax.lax.scan stacks into [L, ...]
buffers: it creates each as broadcast zeros, then the loop overwrites it slot by slot. The weight
gradients of a scan's stacked parameters are collected the same way. XLA:GPU fills those zeros
unless told it need not: on one H200 the fills (`loop_broadcast_fusion`) took 14.0 ms of a
configs/small.py fp8=block step and 8.7 ms of a bf16 one (2026-11-29, BENCHMARKS.md, "FP8").

`xla_gpu_enable_dus_accumulator_zero_init_elimination` (off by default: jaxlib 0.11.2 fills) replaces
such an initializer by an uninitialized allocation when it proves that the loop writes every slot
before reading it (a known trip count, slot i written at iteration i, ascending or descending), so
nothing can read the skipped zeros. With it the same step's fills took 0.4 ms, and the losses after 10
steps stay within the spread of runs without it (none 6.701-6.705 vs 6.701-6.702, block 7.043-7.049
vs 7.046-7.055). It is a DebugOptions field: other backends ignore it,
and jax rejects an option name the installed jaxlib does not know (tests/test_train.py checks each).
jax takes compiler options on top-level jits only: to trace a train step inside another jit, jit
`train.step.train_step` yourself.
"""

TRAINING = {"xla_gpu_enable_dus_accumulator_zero_init_elimination": True}

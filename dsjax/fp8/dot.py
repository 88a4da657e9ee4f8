"""FP8 GEMM y = x @ w for the model's dense and expert layers, one custom_vjp per scaling mode.

DeepSeek-V3 §3.3 runs the three GEMMs of a linear layer (forward, activation gradient dgrad,
weight gradient wgrad) with E4M3 inputs everywhere and float32 accumulation:
- forward    y  = x @ w      x in 1x128 tiles along K, w in 128x128 blocks (§3.3.2);
- dgrad      dx = dy @ w^T   dy in 1x128 tiles along N, the same w blocks (a 128x128 block is
                             still a block after transposition);
- wgrad      dw = x^T @ dy   x and dy re-quantized in 128x1 tiles along tokens (§3.3.3).
Because each 128-wide slice of the contraction has its own scales, partial sums are promoted to
float32 and scaled every 128 elements (§3.3.2, "increasing accumulation precision"). The pure-JAX
path here does exactly that as a split-K loop (`_split_k_matmul`): one fp8 x fp8 product per
128-chunk of the contraction, times sa[m] * sb[n], summed in float32, as the inner loop of
DeepSeek's `fp8_gemm_kernel` does. It is the CPU/TPU path and the reference for a GPU kernel.

Modes (`config.model.fp8`):
- "none":   the input-dtype dot (float32 accumulation), result in out_dtype; plain autodiff.
- "tensor": one current scale amax / 448 per tensor for x, w and dy in all three GEMMs.
- "block":  DeepSeek's recipe above.
In "tensor" and "block", dx and dw come back in the dtypes of x and w. "block"'s forward quantizes
w into both K-major orientations in one pass and keeps, as its residuals, x in wgrad's 128x1 tiles
and w's blocks in dgrad's orientation, named `remat_names.FP8_OPERANDS`: a remat'd layer then saves
them (1 byte per element) rather than re-running both quantizations in the backward pass
(configs/small.py on one H200: BENCHMARKS.md). "tensor" keeps x in fp8 and w itself.

Backends (`config.model.kernel_backend`; chosen by that value, never by probing the platform) set
how one fp8 x fp8 product runs (`_fp8_matmul`):
- "xla_cpu": operands converted to float32 (exact) and an f32 dot; XLA:CPU rejects the
  ANY_F8_ANY_F8_F32 algorithm.
- "xla_tpu": operands converted to bfloat16 (exact: E4M3 is a subset of bf16), f32 accumulation.
- "xla_gpu", "pallas_gpu": fp8 operands straight into lax.dot_general with
  precision=DotAlgorithmPreset.ANY_F8_ANY_F8_F32 (cuBLASLt FP8; DEFAULT precision would switch on
  its fast, ~14-bit accumulation that §3.3.2 warns about).
A block-scaled GPU kernel plugs in at one place, `_block_matmul`: for backend "pallas_gpu" it is
kernel.py's Pallas Mosaic GPU kernel (all three GEMMs of dense layers; `batched=True` still runs
the XLA split-K path there, and operands the kernel cannot take fall back to it with a warning;
"tensor" mode is cuBLASLt as for "xla_gpu"); "pallas_gpu" also quantizes x, dy and w with
quantize_kernel.py's fused kernels (both tile orientations from one read). Measured on one H200
(jax 0.11.2, 2026-11-29), "xla_gpu": all three GEMMs of both modes compile to
`__cublas$lt$matmul$f8`; one fp8 product differs from the exact product of the same q by 0.5-1.3e-4 relative, independent of K (FP8 tensor-core accumulation
between promotions); at M, K, N = 8192, 7168, 2048 in bf16, fwd+bwd took 1.16 ms for "none",
1.22 ms for "tensor" and 14.6 ms for "block" (the scan of K/128 GEMMs is bound by the traffic of
its f32 accumulator), which is what that kernel is for.

Names carry GEMM-local shape letters (not sharding.py's model letters): M tokens, K contraction,
N output columns, E the batch of `batched=True`; I, J, L count the 128-blocks of M, K, N, and k is
one chunk's 128.

Deviations: zero blocks and partial edge blocks as in quantize.py; "tensor" is an extra mode (XLA's
native per-tensor FP8, current scaling, E4M3 for gradients too), not part of DeepSeek's recipe.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax

from dsjax.fallbacks import warn_once
from dsjax.fp8.quantize import quantize_blocks
from dsjax.fp8.quantize_kernel import weight_blocks
from dsjax.remat_names import FP8_OPERANDS, saved

log = logging.getLogger(__name__)

MODES = ("none", "tensor", "block")
BACKENDS = ("xla_cpu", "xla_gpu", "xla_tpu", "pallas_gpu")
BLOCK = 128  # DeepSeek-V3's tile and block edge, and the K-interval of float32 promotion


def _fp8_matmul(a_MK: jax.Array, b_KN: jax.Array, backend: str) -> jax.Array:
    """float32 [M, N] = a @ b for float8_e4m3fn operands, accumulated in float32."""
    if backend in ("xla_gpu", "pallas_gpu"):
        return lax.dot_general(a_MK, b_KN, (((1,), (0,)), ((), ())),
                               precision=lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32,
                               preferred_element_type=jnp.float32)
    if backend == "xla_tpu":
        return jnp.matmul(a_MK.astype(jnp.bfloat16), b_KN.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)
    return jnp.matmul(a_MK.astype(jnp.float32), b_KN.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST)


def _split_k_matmul(qa_MK, sa_MJ, qb_KN, sb_JN, backend: str) -> jax.Array:
    """float32 [M, N] = sum_j (qa[:, chunk j] @ qb[chunk j, :]) * sa[:, j, None] * sb[None, j, :].

    Chunk j is columns/rows [128 j, 128 (j+1)) of the contraction K (the last one partial); sa is
    a's scale per row and chunk (1x128 tiles), sb is b's scale per chunk and column.
    """
    (M, K), N, J = qa_MK.shape, qb_KN.shape[1], sa_MJ.shape[1]
    if J * BLOCK != K:
        qa_MK = jnp.pad(qa_MK, ((0, 0), (0, J * BLOCK - K)))
        qb_KN = jnp.pad(qb_KN, ((0, J * BLOCK - K), (0, 0)))
    qa_JMk = qa_MK.reshape(M, J, BLOCK).transpose(1, 0, 2)
    qb_JkN = qb_KN.reshape(J, BLOCK, N)

    def promote(acc_MN, chunk):
        a_Mk, b_kN, sa_M, sb_N = chunk
        return acc_MN + _fp8_matmul(a_Mk, b_kN, backend) * sa_M[:, None] * sb_N[None, :], None

    acc_MN, _ = lax.scan(promote, jnp.zeros((M, N), jnp.float32), (qa_JMk, qb_JkN, sa_MJ.T, sb_JN))
    return acc_MN


def _block_matmul(qa_MK, sa_MJ, qb_KN, sb_JN, backend: str, out_dtype, sb_blocked: bool = False) -> jax.Array:
    """The one GEMM of block mode (all three passes), in out_dtype: where the GPU kernel plugs in.

    sb_blocked: sb is constant over 128-column blocks (b in 128x128 blocks: forward and dgrad), which
    lets the kernel promote with one FMA per element; wgrad's per-column sb is not.

    Backend "pallas_gpu" runs kernel.py's Pallas Mosaic GPU kernel (K-major fp8 WGMMA, float32
    promotion every 128 K) on b^T (for dgrad that is w itself, so XLA's transposes cancel); it is
    imported here, on first use, so CPU and TPU never import Mosaic GPU. Operands it cannot take
    fall back to the XLA split-K path with one warning per shape. Other backends run that path.
    """
    if backend == "pallas_gpu":
        _check_gpu(backend)
        from dsjax.fp8 import kernel

        qb_NK = qb_KN.T
        reason = kernel.unfit_reason(qa_MK, sa_MJ, qb_NK, sb_JN)
        if reason is None:
            return kernel.block_scaled_matmul(qa_MK, sa_MJ, qb_NK, sb_JN, out_dtype, sb_blocked=sb_blocked)
        warn_once(log, (reason, qa_MK.shape, qb_KN.shape),
                   f"kernel_backend='pallas_gpu' cannot take the block-scaled GEMM "
                   f"{qa_MK.shape} @ {qb_KN.shape}: {reason}; using the XLA split-K path")
    return _split_k_matmul(qa_MK, sa_MJ, qb_KN, sb_JN, backend).astype(out_dtype)


def _check_gpu(backend: str):
    """A clear error for a GPU-only backend elsewhere (validates the config; never picks a backend)."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"kernel_backend {backend!r} runs a Mosaic GPU kernel in fp8 block mode, but "
                         f"JAX's default backend is {jax.default_backend()!r}; use 'xla_cpu' or 'xla_tpu'")



def _per_column(scale_JL: jax.Array, n: int) -> jax.Array:
    """128x128 block scales [J, ceil(n/128)] -> one scale per chunk and column [J, n]."""
    return jnp.repeat(scale_JL, BLOCK, axis=1)[:, :n]


# ---- block mode -------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _block_dot(x_MK, w_KN, backend, out_dtype, x_dtype, w_dtype):
    return _block_fwd(x_MK, w_KN, backend, out_dtype, x_dtype, w_dtype)[0]


def _quantize_both(a_MK, backend):
    """(q_MK, s_MJ, qt_KM, st_KI): a in 1x128 tiles per row (forward, dgrad) and in 128x1 tiles along
    tokens, transposed (wgrad's K-major operand). "pallas_gpu" makes both in one pass
    (quantize_kernel.py, one group of all M rows) when M is a multiple of 128; else two XLA passes."""
    if backend == "pallas_gpu" and a_MK.shape[0] % BLOCK == 0:
        from dsjax.fp8 import quantize_kernel

        if quantize_kernel.unfit_reason(a_MK) is None:
            return quantize_kernel.quantize_rows_and_tiles(a_MK, jnp.full((1,), a_MK.shape[0], jnp.int32))
    q_MK, s_MJ = quantize_blocks(a_MK, (1, BLOCK))
    qt_MK, st_IK = quantize_blocks(a_MK, (BLOCK, 1))
    return q_MK, s_MJ, qt_MK.T, st_IK.T


def _block_fwd(x_MK, w_KN, backend, out_dtype, x_dtype, w_dtype):
    del x_dtype, w_dtype
    qx_MK, sx_MJ, qxt_KM, sxt_KI = _quantize_both(x_MK, backend)
    qw_KN, qwt_NK, sw_JL = (a[0] for a in weight_blocks((w_KN[None],), backend))  # both orientations, one read
    y_MN = _block_matmul(qx_MK, sx_MJ, qwt_NK.T, _per_column(sw_JL, w_KN.shape[1]), backend, out_dtype,
                         sb_blocked=True)
    # the backward's operands, made here once: wgrad's 128x1 tiles of x and dgrad's K-major w
    return y_MN, saved((qxt_KM, sxt_KI, qw_KN, sw_JL), FP8_OPERANDS)


def _block_bwd(backend, out_dtype, x_dtype, w_dtype, res, dy_MN):
    del out_dtype
    qxt_KM, sxt_KI, qw_KN, sw_JL = res
    K = qw_KN.shape[0]
    qdy_MN, sdy_ML, qdyt_NM, sdyt_NI = _quantize_both(dy_MN, backend)
    dx_MK = _block_matmul(qdy_MN, sdy_ML, qw_KN.T, _per_column(sw_JL.T, K), backend, x_dtype, sb_blocked=True)
    dw_KN = _block_matmul(qxt_KM, sxt_KI, qdyt_NM.T, sdyt_NI.T, backend, w_dtype)
    return dx_MK, dw_KN


_block_dot.defvjp(_block_fwd, _block_bwd)


# ---- tensor mode ------------------------------------------------------------------------------

def _quantize_tensor(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    q, scale = quantize_blocks(x, x.shape)
    return q, scale.reshape(())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _tensor_dot(x_MK, w_KN, backend, out_dtype, x_dtype):
    return _tensor_fwd(x_MK, w_KN, backend, out_dtype, x_dtype)[0]


def _tensor_fwd(x_MK, w_KN, backend, out_dtype, x_dtype):
    del x_dtype
    qx_MK, sx = _quantize_tensor(x_MK)
    qw_KN, sw = _quantize_tensor(w_KN)
    y_MN = _fp8_matmul(qx_MK, qw_KN, backend) * (sx * sw)
    return y_MN.astype(out_dtype), (qx_MK, sx, w_KN)


def _tensor_bwd(backend, out_dtype, x_dtype, res, dy_MN):
    del out_dtype
    qx_MK, sx, w_KN = res
    qw_KN, sw = _quantize_tensor(w_KN)
    qdy_MN, sdy = _quantize_tensor(dy_MN)
    dx_MK = _fp8_matmul(qdy_MN, qw_KN.T, backend) * (sdy * sw)
    dw_KN = _fp8_matmul(qx_MK.T, qdy_MN, backend) * (sx * sdy)
    return dx_MK.astype(x_dtype), dw_KN.astype(w_KN.dtype)


_tensor_dot.defvjp(_tensor_fwd, _tensor_bwd, optimize_remat=True)


# ---- public -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fp8Dot:
    """y = x @ w under one FP8 mode and kernel backend; build it with `make_dot`.

    dot(x, w):               x [..., K], w [K, *N]        -> y [..., *N]
    dot(x, w, batched=True): x [E, ..., K], w [E, K, *N]  -> y [E, ..., *N]  (one GEMM per e,
                             e.g. experts; in "tensor" mode each e has its own scales)
    Leading dims of x flatten to tokens M and the dims of N flatten to one, so a weight [K, H, D]
    is blocked as DeepSeek's checkpoints block the same matrix, over (K, H*D).
    out_dtype defaults to x.dtype; gradients come back in the dtypes of x and w.
    """

    mode: str = "none"
    backend: str = "xla_cpu"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fp8 mode {self.mode!r} is not one of {MODES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"kernel_backend {self.backend!r} is not one of {BACKENDS}")

    def __call__(self, x: jax.Array, w: jax.Array, *, out_dtype=None, batched: bool = False):
        out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
        if self.mode == "block" and self.backend == "pallas_gpu":
            _check_gpu(self.backend)  # before any kernel (the quantization's come first)
        if batched:
            if x.ndim < 2 or w.ndim < 3 or x.shape[0] != w.shape[0]:
                raise ValueError(f"batched fp8 dot needs x [E, ..., K] and w [E, K, *N] with one E; "
                                 f"got x {x.shape}, w {w.shape}")
            dense = self
            if self.mode == "block" and self.backend == "pallas_gpu":
                # The Pallas kernel has no batching rule; a grouped (expert) variant is future work.
                warn_once(log, ("batched", self.backend), "kernel_backend='pallas_gpu': batched (expert) "
                           "block-scaled GEMMs run the XLA split-K path (xla_gpu)")
                dense = dataclasses.replace(self, backend="xla_gpu")
            return jax.vmap(functools.partial(dense._dense, out_dtype=out_dtype))(x, w)
        return self._dense(x, w, out_dtype=out_dtype)

    def _dense(self, x, w, *, out_dtype):
        if x.ndim < 1 or w.ndim < 2 or x.shape[-1] != w.shape[0]:
            raise ValueError(f"fp8 dot needs x [..., K] and w [K, *N] with one K; "
                             f"got x {x.shape}, w {w.shape}")
        lead, n_dims, K = x.shape[:-1], w.shape[1:], w.shape[0]
        x_MK, w_KN = x.reshape(-1, K), w.reshape(K, -1)
        if self.mode == "none":
            # XLA accumulates a bf16 dot in f32 on CPU, GPU and TPU. An explicit f32 result cast to
            # bf16 gave the same forward on H200 but made autodiff run both backward GEMMs in f32
            # (fwd+bwd 2.48 vs 1.33 ms at 8192x7168x2048).
            y_MN = jnp.matmul(x_MK, w_KN, preferred_element_type=out_dtype)
        else:
            if self.mode == "block":
                y_MN = _block_dot(x_MK, w_KN, self.backend, out_dtype, jnp.dtype(x.dtype), jnp.dtype(w_KN.dtype))
            else:
                y_MN = _tensor_dot(x_MK, w_KN, self.backend, out_dtype, jnp.dtype(x.dtype))
        return y_MN.reshape(*lead, *n_dims)


def make_dot(mode: str, backend: str) -> Fp8Dot:
    """The model's GEMM: `make_dot(config.fp8, config.kernel_backend)(x, w)`."""
    return Fp8Dot(mode, backend)

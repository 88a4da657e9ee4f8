"""Building blocks: RMSNorm, Dense with a pluggable (FP8-capable) matmul, SwiGLU, embedding.

RMSNorm runs in float32 (DeepSeek-V3 §3.3.1 keeps norms out of low precision). Dense kernels are
stored as [in..., out...] with logical axis names for every dim; the matmul goes through
`dsjax.fp8.make_dot(config.fp8, config.kernel_backend)`, so one config value switches every dense
and expert GEMM between bf16/fp32, per-tensor FP8 and DeepSeek's block-scaled FP8.

FP8 GEMM outputs are named `remat_names.SAVED_GEMM` (remat's dot policies do not recognize the FP8
custom VJPs) so that decoder.REMAT_POLICIES keeps them as they keep plain dots' outputs; otherwise
the backward pass re-runs those GEMMs (with FP8 on, 21 of a 3-layer model's 24 dense forward GEMMs
were re-run under remat "minimal").
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax import fp8
from dsjax.config import ModelConfig
from dsjax.remat_names import SAVED_GEMM, saved


def dtype_of(name: str):
    return jnp.dtype(name)


def init_normal(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
    """y = x / rms(x) * scale, computed in float32, returned in the compute dtype."""

    dim: int
    config: ModelConfig
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (self.dim,), dtype_of(self.config.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        out_dtype = dtype_of(self.out_dtype or self.config.dtype)
        return (scale.astype(jnp.float32) * y).astype(out_dtype)


def matmul(x_NK, w_KM, config: ModelConfig, *, island: bool = False, out_dtype=None):
    """x [N, K] @ w [K, M] through the configured dot: FP8 unless `island` (DeepSeek-V3 §3.3.1 keeps
    the embedding, output head and router in higher precision)."""
    mode = "none" if island else config.fp8
    y_NM = fp8.make_dot(mode, config.kernel_backend)(x_NK, w_KM, out_dtype=out_dtype or dtype_of(config.dtype))
    return y_NM if mode == "none" else saved(y_NM, SAVED_GEMM)  # a plain dot is saved by the dot policies


class Dense(nn.Module):
    """A bias-free projection contracting the last `len(in_shape)` dims of x with a kernel
    [*in_shape, *out_shape]; `names` are the logical axis names of the kernel's dims."""

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    names: Sequence[str]
    config: ModelConfig
    island: bool = False  # never FP8 (output head)
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x):
        in_shape, out_shape = tuple(self.in_shape), tuple(self.out_shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(init_normal(self.config), tuple(self.names)),
                            in_shape + out_shape, dtype_of(self.config.param_dtype))
        lead = x.shape[: x.ndim - len(in_shape)]
        x_NK = x.reshape(lead + (math.prod(in_shape),)).astype(dtype_of(self.config.dtype))
        w_KM = kernel.reshape(math.prod(in_shape), math.prod(out_shape)).astype(dtype_of(self.config.dtype))
        y_NM = matmul(x_NK, w_KM, self.config, island=self.island,
                      out_dtype=dtype_of(self.out_dtype) if self.out_dtype else None)
        return y_NM.reshape(lead + out_shape)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts (DeepSeek-V2 §2.2)."""

    hidden: int
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        d = self.config.hidden_size
        gate_BTF = Dense((d,), (self.hidden,), ("embed", "mlp"), self.config, name="gate")(x_BTD)
        up_BTF = Dense((d,), (self.hidden,), ("embed", "mlp"), self.config, name="up")(x_BTD)
        h_BTF = nn.with_logical_constraint(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        return Dense((self.hidden,), (d,), ("mlp", "embed"), self.config, name="down")(h_BTF)


class Embed(nn.Module):
    """Token embedding [V, D] (the output head is a separate, untied [D, V] Dense)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT):
        c = self.config
        table_VD = self.param("embedding", nn.with_logical_partitioning(init_normal(c), ("vocab", "embed")),
                              (c.vocab_size, c.hidden_size), dtype_of(c.param_dtype))
        return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype_of(c.dtype))

"""The fused FP8 quantization kernel (dsjax/fp8/quantize_kernel.py) in Pallas's interpreter equals
the XLA passes it replaces, bit for bit: 1x128 row tiles (quantize_blocks) and the weight gradient's
group-aligned, transposed 128x1 tiles (grouped.quantize_wgrad)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.fp8 import grouped, quantize_blocks, quantize_kernel


def _activation(m: int, d: int, seed: int = 0) -> jax.Array:
    r = np.random.RandomState(seed)
    a = r.randn(m, d) * np.exp(2 * r.randn(m, 1))  # rows of very different magnitude
    a[256:, :128] = 0.0  # all-zero 1x128 and 128x1 tiles (scale 1)
    return jnp.asarray(a, jnp.bfloat16)


def _bits(x) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint8)) if x.dtype == jnp.float8_e4m3fn else np.asarray(x)


@pytest.mark.parametrize("sizes", [[100, 0, 130, 3, 40], [300], [0, 0, 256, 1]])
def test_fused_quantization_equals_the_xla_passes(sizes):
    """Uneven groups, an empty one, rows past the groups (sum < M), M not a multiple of 128."""
    a = _activation(300, 384)
    gs = jnp.asarray(sizes, jnp.int32)
    rows = int(gs.sum())
    q, s, qt, st = quantize_kernel.quantize_rows_and_tiles(a, gs, interpret=True)
    q_want, s_want = quantize_blocks(a, (1, 128))
    qt_want, st_want = grouped.quantize_wgrad(a, gs)
    np.testing.assert_array_equal(_bits(q)[:rows], _bits(q_want)[:rows])  # rows past the groups: unwritten
    np.testing.assert_array_equal(_bits(s)[:rows], _bits(s_want)[:rows])
    np.testing.assert_array_equal(_bits(qt), _bits(qt_want))
    np.testing.assert_array_equal(_bits(st), _bits(st_want))
    assert (np.asarray(st_want) == 1.0).sum() >= 128 and (np.asarray(s_want)[256:rows, 0] == 1.0).all()  # zero tiles


def test_one_group_gives_the_dense_128x1_tiles():
    """A dense layer is one group of all M rows (M a multiple of 128): qt is x's 128x1 tiles, transposed."""
    a = _activation(256, 256, seed=1)
    q, s, qt, st = quantize_kernel.quantize_rows_and_tiles(a, jnp.asarray([256], jnp.int32), interpret=True)
    qt_want, st_want = quantize_blocks(a, (128, 1))
    np.testing.assert_array_equal(_bits(qt), _bits(qt_want.T))
    np.testing.assert_array_equal(_bits(st), _bits(st_want.T))


def test_shapes_it_cannot_take_are_named():
    with pytest.raises(ValueError, match=r"\(300, 200\).*multiple of 128"):
        quantize_kernel.quantize_rows_and_tiles(jnp.zeros((300, 200), jnp.bfloat16), jnp.asarray([300]))


def test_weight_blocks_in_both_orientations_equal_quantize_blocks():
    """Stacked weights in 128x128 blocks: q, q^T and the scales equal quantize_blocks of w and of w^T
    (an all-zero block gets scale 1); shapes the kernel cannot take go to XLA with the same values."""
    r = np.random.RandomState(2)
    w = jnp.asarray(r.randn(3, 256, 384) * np.exp(r.randn(3, 1, 384)), jnp.bfloat16).at[1, :128, 128:256].set(0)
    q, qt, s = quantize_kernel.quantize_weight_blocks(w, interpret=True)
    q_want, s_want = quantize_blocks(w, (128, 128))
    qt_want, st_want = quantize_blocks(w.transpose(0, 2, 1), (128, 128))
    np.testing.assert_array_equal(_bits(q), _bits(q_want))
    np.testing.assert_array_equal(_bits(qt), _bits(qt_want))
    np.testing.assert_array_equal(_bits(s), _bits(s_want))
    np.testing.assert_array_equal(_bits(s), _bits(st_want.transpose(0, 2, 1)))
    assert float(s[1, 0, 1]) == 1.0
    odd = w[:, :, :200]  # N not a multiple of 128: the XLA path
    q_odd, qt_odd, s_odd = quantize_kernel.weight_blocks((odd,), "pallas_gpu")
    q_odd_want, s_odd_want = quantize_blocks(odd, (128, 128))
    np.testing.assert_array_equal(_bits(qt_odd), _bits(q_odd_want.transpose(0, 2, 1)))
    np.testing.assert_array_equal(_bits(s_odd), _bits(s_odd_want))


def test_weight_blocks_of_a_concatenation():
    """Weights given apart (the experts' gate and up) quantize exactly as their concatenation
    along N, in the kernel and on XLA's path."""
    r = np.random.RandomState(3)
    w = jnp.asarray(r.randn(2, 256, 640) * np.exp(r.randn(2, 1, 640)), jnp.bfloat16)
    parts = (w[:, :, :256], w[:, :, 256:384], w[:, :, 384:])
    want = quantize_kernel.quantize_weight_blocks(w, interpret=True)
    for got in (quantize_kernel.quantize_weight_blocks(*parts, interpret=True),
                quantize_kernel.weight_blocks(parts, "xla_cpu")):
        for g, e in zip(got, want):
            np.testing.assert_array_equal(_bits(g), _bits(e))
    with pytest.raises(ValueError, match="one \\[G, K\\]"):
        quantize_kernel.quantize_weight_blocks(parts[0], parts[1][:, :128], interpret=True)


def test_kernels_lower_for_cuda(monkeypatch):
    """Pallas -> Triton lowering for sm_90 on CPU (no PTX): the dynamic-start masked tiles, the
    in-register transposes, the fp8 stores and the per-block scalar scale."""
    from jax._src.pallas.triton import pallas_call_registration as registration
    from jax.experimental.pallas import triton as plgpu

    if jax.__version_info__ >= (0, 11):  # 0.11 asks the device which GPU it lowers for; 0.10 assumes sm_90
        monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info",
                            lambda: plgpu.get_gpu_info_from_version(plgpu.GpuVersion.H200))
    calls = ((quantize_kernel.quantize_rows_and_tiles, (jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16),
                                                        jax.ShapeDtypeStruct((8,), jnp.int32))),
             (quantize_kernel.quantize_weight_blocks, (jax.ShapeDtypeStruct((4, 256, 384), jnp.bfloat16),)),
             (quantize_kernel.quantize_weight_blocks, (jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16),
                                                       jax.ShapeDtypeStruct((4, 256, 128), jnp.bfloat16))))
    for fn, args in calls:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text

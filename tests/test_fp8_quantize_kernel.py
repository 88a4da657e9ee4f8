"""The fused FP8 quantization kernel (dsjax/fp8/quantize_kernel.py) in Pallas's interpreter equals
the XLA passes it replaces, bit for bit: 1x128 row tiles (quantize_blocks) and the weight gradient's
group-aligned, transposed 128x1 tiles (grouped.quantize_wgrad)."""

from __future__ import annotations

import functools

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


@pytest.mark.parametrize("column_blocks", [2, 4])
def test_several_column_blocks_per_program_give_the_same_bits(column_blocks):
    """column_blocks (consecutive 128-column blocks per program, a speed tunable) changes no value."""
    a, gs = _activation(300, 512, seed=2), jnp.asarray([100, 0, 130, 3, 40], jnp.int32)
    rows = int(gs.sum())
    want = quantize_kernel.quantize_rows_and_tiles(a, gs, interpret=True)
    got = quantize_kernel.quantize_rows_and_tiles(a, gs, interpret=True, column_blocks=column_blocks)
    for g, e, valid in zip(got, want, (rows, rows, None, None)):  # rows past the groups: unwritten
        np.testing.assert_array_equal(_bits(g)[:valid], _bits(e)[:valid])
    with pytest.raises(ValueError, match="column_blocks=3 does not divide the 4 128-column blocks"):
        quantize_kernel.quantize_rows_and_tiles(a, gs, interpret=True, column_blocks=3)


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


def test_weight_blocks_from_float32_masters_round_to_the_compute_dtype_first():
    """`round_to`: float32 weights (two, concatenated) quantize as their bf16 cast would, bit for bit,
    in the kernel and on XLA's path; without it the float32 values quantize differently (the
    rounding is not a no-op on these values)."""
    r = np.random.RandomState(4)
    w = jnp.asarray(r.randn(2, 256, 384) * np.exp(r.randn(2, 1, 384)), jnp.float32)
    parts = (w[:, :, :256], w[:, :, 256:])
    want = quantize_kernel.quantize_weight_blocks(*(p.astype(jnp.bfloat16) for p in parts), interpret=True)
    for got in (quantize_kernel.quantize_weight_blocks(*parts, round_to="bfloat16", interpret=True),
                quantize_kernel.weight_blocks(parts, "xla_cpu", round_to="bfloat16")):
        for g, e in zip(got, want):
            np.testing.assert_array_equal(_bits(g), _bits(e))
    unrounded = quantize_kernel.quantize_weight_blocks(*parts, interpret=True)
    assert (_bits(unrounded.q_GKN) != _bits(want.q_GKN)).any()


def test_outputs_that_32_bit_offsets_cannot_address_are_written_as_uint16_pairs(monkeypatch):
    """Pallas's Triton lowering addresses arrays of at most 2^32 bytes with 32-bit element offsets,
    which wrap past 2^31 elements: weight blocks past that are written as uint16 pairs (half the
    elements) and viewed back as fp8, equal to the plain kernel's, for one weight and for two
    concatenated, rounded from float32; activations past it go to XLA's passes. The limit is scaled
    down here (2^31 elements -> 2^18) so that small arrays take those paths."""
    from dsjax.fp8 import quantize_kernel as qk

    assert qk.offsets_wrap((448, 2048, 2816), jnp.float8_e4m3fn)  # small.py's gate|up, 7 layers
    assert not qk.offsets_wrap((448, 2048, 1408), jnp.float8_e4m3fn)  # its down blocks
    assert not qk.offsets_wrap((448, 2048, 2816), jnp.float32)  # > 2^32 bytes: 64-bit offsets
    r = np.random.RandomState(5)
    w = jnp.asarray(r.randn(3, 256, 384) * np.exp(r.randn(3, 1, 384)), jnp.float32).at[1, :128, :128].set(0)
    cases = (((w.astype(jnp.bfloat16),), None), ((w[:, :, :128], w[:, :, 128:]), "bfloat16"))
    want = [qk.quantize_weight_blocks.__wrapped__(*ws, round_to=rt, interpret=True) for ws, rt in cases]
    monkeypatch.setattr(qk, "OFFSET_LIMIT", 2**18)  # 3 x 256 x 384 fp8 elements now wrap
    assert qk.offsets_wrap((3, 256, 384), jnp.float8_e4m3fn)
    for (ws, rt), expected in zip(cases, want):
        got = qk.quantize_weight_blocks.__wrapped__(*ws, round_to=rt, interpret=True)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == e.dtype
            np.testing.assert_array_equal(_bits(g), _bits(e))
    assert "wrap" in qk.unfit_reason(jnp.zeros((1024, 256), jnp.bfloat16))
    assert qk.unfit_reason(jnp.zeros((128, 256), jnp.bfloat16)) is None


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
             (functools.partial(quantize_kernel.quantize_rows_and_tiles, column_blocks=2),
              (jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16), jax.ShapeDtypeStruct((8,), jnp.int32))),
             (quantize_kernel.quantize_weight_blocks, (jax.ShapeDtypeStruct((4, 256, 384), jnp.bfloat16),)),
             (quantize_kernel.quantize_weight_blocks, (jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16),
                                                       jax.ShapeDtypeStruct((4, 256, 128), jnp.bfloat16))),
             # uint16 pairs (strided parity loads and stores), from float32 rounded to bf16: 2.58e9 elements
             (functools.partial(quantize_kernel.quantize_weight_blocks, round_to="bfloat16"),
              (jax.ShapeDtypeStruct((448, 2048, 1408), jnp.float32),) * 2))
    for fn, args in calls:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text

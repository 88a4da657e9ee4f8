"""The flash-decoding kernel (interpreted on CPU) against a direct softmax, and in the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import decode_attention


def reference(q_lat, q_rope, q_pos, c, kr, kv_pos, scale):
    scores = (np.einsum("bqc,bsc->bqs", q_lat, c) + np.einsum("bqr,bsr->bqs", q_rope, kr)) * scale
    visible = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bqs,bsc->bqc", p / p.sum(-1, keepdims=True), c)


@pytest.mark.parametrize("rows,slots", [(4, 128), (12, 256), (32, 64), (80, 128)])  # 80: three row tiles
def test_kernel_matches_softmax(rows, slots):
    r = np.random.RandomState(rows)
    b, c, rope = 3, 32, 16
    q_lat, q_rope = r.randn(b, rows, c).astype(np.float32), r.randn(b, rows, rope).astype(np.float32)
    cache, kr = r.randn(b, slots, c).astype(np.float32), r.randn(b, slots, rope).astype(np.float32)
    kv_pos = np.tile(np.arange(slots, dtype=np.int32), (b, 1))
    kv_pos[0, slots // 2:] = -1  # a row with an unfilled tail
    kv_pos[1, :5] = -1  # left padding
    kv_pos[2] = r.permutation(slots)  # slots in any order (a ring)
    q_pos = np.full((b, rows), slots // 3, np.int32)
    q_pos[:, -1] = slots  # the last query row sees everything it may
    o, m, l = decode_attention.latent_attention(q_lat, q_rope, q_pos, cache, kr, kv_pos, scale=0.3, interpret=True)
    got = np.asarray(o) / np.asarray(l)[..., None]
    np.testing.assert_allclose(got, reference(q_lat, q_rope, q_pos, cache, kr, kv_pos, 0.3), rtol=2e-5, atol=2e-5)


def test_row_that_sees_nothing_has_zero_mass():
    b, rows, c, rope, slots = 1, 16, 16, 16, 64
    z = jnp.zeros
    o, m, l = decode_attention.latent_attention(z((b, rows, c)), z((b, rows, rope)), jnp.full((b, rows), 3, jnp.int32),
                                                jnp.ones((b, slots, c)), z((b, slots, rope)),
                                                jnp.full((b, slots), -1, jnp.int32), scale=1.0, interpret=True)
    assert float(jnp.abs(l).max()) == 0.0 and float(jnp.abs(o).max()) == 0.0


def test_fits():
    assert decode_attention.fits(512, 64, 4096)  # V3's latent and rope widths
    assert not decode_attention.fits(512, 64, 100)  # slots not a multiple of the block
    assert not decode_attention.fits(500, 64, 4096)
    assert not decode_attention.fits(32, 8, 4096)  # the tiny preset's rope width: XLA path


def test_model_decode_with_the_kernel_equals_the_xla_path():
    """Prefill (row tiles: T·H > MAX_ROWS) and decode steps through MLA with decode_attention
    'pallas' (interpreted) give the XLA path's logits, with left-padded prompts."""
    import dataclasses

    from flax import linen as nn

    from dsjax.config import replace
    from dsjax.inference import cache as cache_lib, engine
    from dsjax.model import Transformer
    from tests import presets

    xla = replace(presets.load("tiny").model, initializer_range=0.2, **{"mla.qk_rope_head_dim": 16})
    kernel = dataclasses.replace(xla, decode_attention="pallas")
    variables = nn.unbox(Transformer(xla).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    lengths = jnp.asarray([5, 12])
    r = np.random.RandomState(0)
    tokens = r.randint(0, 256, (2, 12)).astype(np.int32)
    steps = r.randint(0, 256, (2, 4)).astype(np.int32)
    logits = {}
    for name, config in (("xla", xla), ("pallas", kernel)):
        cache = cache_lib.init_cache(config, 2, 64, mtp=False)
        out, state = jax.jit(lambda v, t, n, c, config=config: engine.prefill(config, v, t, n, c))(
            variables, tokens, lengths, cache)
        rows = [np.asarray(out.logits)]
        decode = jax.jit(lambda v, st, t, config=config: engine.decode(config, v, st, t))
        uses_kernel = "pallas_call" in str(jax.make_jaxpr(decode)(variables, state, steps[:, :1]))
        assert uses_kernel == (name == "pallas"), name
        for i in range(steps.shape[1]):
            out, state = decode(variables, state, steps[:, i:i + 1])
            rows.append(np.asarray(out.logits))
        logits[name] = np.concatenate(rows, axis=1)
    real = np.concatenate([np.arange(12)[None, :] >= 12 - np.asarray(lengths)[:, None], np.ones((2, 4), bool)], 1)
    worst = np.abs(logits["pallas"] - logits["xla"])[real].max()
    print(f"max |pallas - xla| logit difference: {worst:.2e}")
    assert worst <= 1e-4


def test_sharded_call_over_a_mesh_equals_one_device():
    """Under a (2, 2, 2) mesh the kernel runs per device on its batch rows (shard_map over
    ('data', 'expert')) and gives the single-device result."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsjax import sharding as shd
    from dsjax.config import MeshConfig

    r = np.random.RandomState(7)
    b, rows, c, rope, slots = 8, 16, 32, 16, 128
    args = [r.randn(b, rows, c).astype(np.float32), r.randn(b, rows, rope).astype(np.float32),
            np.full((b, rows), slots, np.int32), r.randn(b, slots, c).astype(np.float32),
            r.randn(b, slots, rope).astype(np.float32), np.tile(np.arange(slots, dtype=np.int32), (b, 1))]
    args[5][:, -7:] = -1
    one = decode_attention.latent_attention(*args, scale=0.2, interpret=True)
    mesh = shd.make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    placed = [jax.device_put(a, NamedSharding(mesh, P(("data", "expert")))) for a in args]
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda *a: decode_attention.sharded_latent_attention(*a, scale=0.2, interpret=True))
        assert "shard_map" in str(jax.make_jaxpr(fn)(*placed))
        many = fn(*placed)
    for x, y in zip(many, one):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)

"""The flash-decoding kernel alone (GPU) against XLA's two-einsum absorbed attention, one shape per run.

    python scripts/bench.py decode_attention --batch=32 --slots=32768 [--block=64 --warps=4 --stages=2 --max_split=1024]
    python scripts/bench.py decode_attention --batch=2 --slots=256 --interpret     # CPU check of the script

Times dsjax.model.decode_attention.latent_attention (normalized: o / l) and the XLA path the model
uses without it (scores over the latent cache and rope keys, masked softmax, weighted sum of the
cache) on random bf16 inputs of configs/small.py's widths (16 heads, C 512, R 64), 20 calls each
after a warm-up, and prints milliseconds, the cache bytes read per millisecond (GB/s, counting the
cache once) and the largest difference. The kernel's tiling constants are set from the flags, so a
run can compare tilings without editing the module.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BATCH = flags.DEFINE_integer("batch", 32, "batch rows")
_SLOTS = flags.DEFINE_integer("slots", 32768, "cached slots attended")
_HEADS = flags.DEFINE_integer("heads", 16, "query rows per batch row (T·H)")
_BLOCK = flags.DEFINE_integer("block", 64, "decode_attention.BLOCK_S")
_WARPS = flags.DEFINE_integer("warps", 4, "decode_attention.NUM_WARPS")
_STAGES = flags.DEFINE_integer("stages", 2, "decode_attention.NUM_STAGES")
_MAX_SPLIT = flags.DEFINE_integer("max_split", 1024, "decode_attention.MAX_SPLIT")
_INTERPRET = flags.DEFINE_bool("interpret", False, "run the kernel interpreted (a CPU check of the script)")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from dsjax.model import decode_attention as da
    from dsjax.timing import seconds_per_call

    da.BLOCK_S, da.NUM_WARPS, da.NUM_STAGES, da.MAX_SPLIT = _BLOCK.value, _WARPS.value, _STAGES.value, _MAX_SPLIT.value
    b, s, h, c, r, scale = _BATCH.value, _SLOTS.value, _HEADS.value, 512, 64, 0.1
    keys = jax.random.split(jax.random.key(0), 4)
    q_lat_BQC = jax.random.normal(keys[0], (b, h, c), jnp.bfloat16)
    q_rope_BQR = jax.random.normal(keys[1], (b, h, r), jnp.bfloat16)
    c_BSC = jax.random.normal(keys[2], (b, s, c), jnp.bfloat16)
    kr_BSR = jax.random.normal(keys[3], (b, s, r), jnp.bfloat16)
    kv_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos_BQ = jnp.full((b, h), s, jnp.int32)
    args = (q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC, kr_BSR, kv_pos_BS)

    def xla(q_lat_BQC, q_rope_BQR, q_pos_BQ, c_BSC, kr_BSR, kv_pos_BS):
        scores_BQS = (jnp.einsum("BQC,BSC->BQS", q_lat_BQC, c_BSC, preferred_element_type=jnp.float32)
                      + jnp.einsum("BQR,BSR->BQS", q_rope_BQR, kr_BSR, preferred_element_type=jnp.float32)) * scale
        visible_BQS = (kv_pos_BS[:, None] >= 0) & (kv_pos_BS[:, None] <= q_pos_BQ[..., None])
        probs_BQS = jax.nn.softmax(jnp.where(visible_BQS, scores_BQS, -1e30), -1).astype(c_BSC.dtype)
        return jnp.einsum("BQS,BSC->BQC", probs_BQS, c_BSC)

    def kernel(*a):
        o_BQC, _, l_BQ = da.latent_attention(*a, scale=scale, interpret=_INTERPRET.value)
        return (o_BQC / l_BQ[..., None]).astype(c_BSC.dtype)

    cache_gb = (c_BSC.size + kr_BSR.size) * 2 / 1e9
    out = {}
    for name, fn in (("xla", xla), ("pallas", kernel)):
        f = jax.jit(fn)
        out[name] = (f(*args), seconds_per_call(f, *args, repeat=20))
    diff = float(jnp.abs(out["xla"][0].astype(jnp.float32) - out["pallas"][0].astype(jnp.float32)).max())
    print(f"B={b} S={s} rows={h} block={da.BLOCK_S} warps={da.NUM_WARPS} stages={da.NUM_STAGES} "
          f"max_split={da.MAX_SPLIT}: " + "  ".join(
              f"{n} {t * 1e3:.3f} ms ({cache_gb / t:,.0f} GB/s)" for n, (_, t) in out.items())
          + f"  max|diff| {diff:.3g}", flush=True)


if __name__ == "__main__":
    app.run(main)

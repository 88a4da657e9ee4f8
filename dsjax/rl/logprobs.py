"""Per-token log-probabilities of sampled completions, from one full-sequence forward.

GRPO needs log π(o_t | q, o_<t) for every completion token under three parameter sets: the policy
being trained (with gradient), the policy that sampled (`old`, when μ > 1) and the frozen
reference (β > 0). dsjax computes all three the same way: one causal forward over the
[left-padded prompt + completion] rows of a `rollout.UpdateBatch`, then the log-softmax of the
logits one position to the left of each completion token, gathered at that token (float32).

Router replay (issue 6; "nobody has this yet" for MoE in JAX): with `replay` the MoE layers use
the experts the engine chose while sampling (gate weights stay live, so the router keeps its
gradient), so training scores exactly the computation that produced the tokens.

Memory: a forward holds [B, L, V] logits; `microbatches` splits the rows into that many chunks run
one after another (`lax.map`). Chunk j holds rows j, j+m, j+2m, … (strided, not contiguous), so a
chunk of a batch sharded over ('data', 'expert') is still spread over every device.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dsjax import sharding as shd
from dsjax.config import ModelConfig
from dsjax.model import ModelOutput, ReplayIds, Transformer, compute_variables


def split_rows(x, m: int, axis: int = 0):
    """[..., B, ...] -> [m, ..., B/m, ...]; chunk j holds rows j, j+m, j+2m, … (keeps the sharding)."""
    b = x.shape[axis]
    if b % m:
        raise ValueError(f"split_rows: batch of {b} rows does not divide into {m} microbatches")
    x = x.reshape(x.shape[:axis] + (b // m, m) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)


def merge_rows(x, axis: int = 0):
    """Inverse of split_rows: [m, ..., B/m, ...] -> [..., B, ...]."""
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def split_replay(replay: Optional[ReplayIds], m: int):
    """ReplayIds with moe [L, B, T, k] and mtp [B, T, k] split like split_rows (batch axes 1 and 0)."""
    if replay is None:
        return None
    return ReplayIds(None if replay.moe is None else split_rows(replay.moe, m, axis=1),
                     tuple(None if r is None else split_rows(r, m) for r in replay.mtp))


def policy_forward(config: ModelConfig, variables, batch: dict, replay: Optional[ReplayIds] = None,
                   return_mtp: bool = False) -> ModelOutput:
    """The model on a batch's rows (tokens, positions, segment_ids), experts replayed if given."""
    if replay is not None and return_mtp:
        missing = config.mtp.num_nextn_predict_layers - len(replay.mtp)
        replay = replay._replace(mtp=tuple(replay.mtp) + (None,) * max(missing, 0))  # unrecorded: route live
    elif replay is not None:
        replay = replay._replace(mtp=())
    variables = compute_variables(config, variables)  # cast once, outside the scans
    with shd.activation_rules():
        return Transformer(config).apply(variables, batch["tokens"], batch["positions"], batch["segment_ids"],
                                         replay=replay, return_mtp=return_mtp, full_output=True)


def gather_logprobs(logits_BLV, tokens_BL, completion_length: int):
    """(log-prob [B, Lc] of each completion token, entropy [B, Lc] of the distribution it was drawn
    from), float32; the completion is the last `completion_length` columns of tokens_BL."""
    lc = completion_length
    logits_BCV = logits_BLV[:, -lc - 1:-1].astype(jnp.float32)
    logsm_BCV = jax.nn.log_softmax(logits_BCV, axis=-1)
    logp_BC = jnp.take_along_axis(logsm_BCV, tokens_BL[:, -lc:, None], axis=-1)[..., 0]
    entropy_BC = -(jnp.exp(logsm_BCV) * logsm_BCV).sum(-1)
    return logp_BC, entropy_BC


def completion_logprobs(config: ModelConfig, variables, batch: dict, *, replay: Optional[ReplayIds] = None,
                        microbatches: int = 1) -> jax.Array:
    """float32 [B, Lc] log-probs of batch['tokens']' completion columns (Lc = completion_mask width),
    forwarded in `microbatches` chunks of rows; padded positions hold finite garbage."""
    lc = batch["completion_mask"].shape[1]

    def one(args):
        rows, rows_replay = args
        out = policy_forward(config, variables, rows, rows_replay)
        return gather_logprobs(out.logits, rows["tokens"], lc)[0]

    rows = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
    if microbatches == 1:
        return one((rows, replay))
    chunks = jax.tree_util.tree_map(lambda x: split_rows(x, microbatches), rows)
    return merge_rows(jax.lax.map(one, (chunks, split_replay(replay, microbatches))))

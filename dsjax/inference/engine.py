"""Batched generation: one jit-compiled function from left-padded prompts to sampled completions.

    prefill   one forward over the prompts [B, P] with the latent cache (writes slots 0..P-1),
              sample token 0 from the last column's logits;
    decode    a lax.while_loop of one-token forwards (absorbed MLA over the latent cache,
              DeepSeek-V2 §2.1.2), sampling each next token, until every row has emitted EOS or
              max_new_tokens tokens. No host round trip and no per-token recompilation.

Left padding: a row of length n occupies the last n of the P prompt columns; its tokens get
positions 0..n-1 and its pad slots kv position -1, so they are never attended and every row sees
exactly what an unpadded run of it would (same keys, same rotary phases; tested to 1e-4 against
the full-sequence forward). Completions are written from slot P on, at each row's own positions.

`generate_tokens` is the engine the public `inference.generate` and the GRPO rollout share. With
`record_experts` it also returns the routed experts of every [prompt + completion] column as
`ReplayIds` (MoE layers only: the MTP modules take no part in sampling), so a later full-sequence
forward can replay exactly the routing the sampler saw (`Transformer.apply(..., replay=...)`).
Columns never fed to the model (left padding is fed; completion slots after a row's end are
not) get a fixed spread of expert ids: they carry no loss, and spreading them keeps capacity
dispatch from piling padding onto one expert.

Deviation from DeepSeek's reference `inference/generate.py`: it right-pads the prompts and steps
a Python loop from the shortest prompt's length, overwriting sampled tokens with prompt tokens
where a prompt is longer (one host sync per step for its EOS check); dsjax left-pads, prefills
every prompt in one forward and keeps the loop on device. The prefill computes logits for every
prompt column (the model has no last-column-only head): [B, P, V] float32 is the prefill's
largest activation.

Weights: both loops run on `model.compute_variables` (every weight cast once to the compute dtype
inside the jitted call, before the prefill; router kernels, norm scales and the router bias stay
float32). Master weights are float32 by default, and XLA does not hoist a cast out of the loop
body: every decode step re-read the float32 weights and wrote bf16 copies. On one H200 with
configs/small.py at batch 32 that took batched generation from 3,173 to 7,123 tokens/s
(BENCHMARKS.md, side by side with transformers).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax import sharding as shd
from dsjax.config import ModelConfig
from dsjax.inference import cache as cache_lib
from dsjax.inference import sampling
from dsjax.model import CacheView, ModelCache, ModelOutput, ReplayIds, Transformer, compute_variables


class DecodeState(NamedTuple):
    """The cache and where the next tokens go: slot `write_index`, positions from `next_position_B`."""

    cache: ModelCache
    kv_positions_BS: jax.Array  # int32: position held by each slot, -1 if none
    write_index: jax.Array  # int32 scalar: next slot to write
    next_position_B: jax.Array  # int32: position of each row's next token


class GenerationResult(NamedTuple):
    tokens: jax.Array  # int32 [B, N]: completions, pad_id after each row's end
    lengths: jax.Array  # int32 [B]: tokens generated per row, EOS included
    replay: Optional[ReplayIds]  # with record_experts: moe [L_moe, B, P + N, k], mtp ()
    steps: jax.Array  # int32: model forwards after the prefill (decode steps or verify cycles)
    drafted: Optional[jax.Array] = None  # int32 [B]: MTP drafts proposed (speculative only)
    accepted: Optional[jax.Array] = None  # int32 [B]: drafts accepted (speculative only)


def acceptance_rate(result: GenerationResult) -> float:
    """Accepted / drafted over the batch (speculative results)."""
    if result.drafted is None:
        raise ValueError("acceptance_rate needs a speculative result (speculative.generate_tokens)")
    drafted, accepted = jax.device_get((result.drafted.sum(), result.accepted.sum()))
    return float(accepted) / max(float(drafted), 1.0)


def prompt_layout(prompt_lengths_B, p: int):
    """Left-padded layout of [B, P] prompts: (positions, segment ids, kv positions), int32 [B, P]."""
    col_P = jnp.arange(p, dtype=jnp.int32)
    pad_B = p - prompt_lengths_B.astype(jnp.int32)
    real_BP = col_P[None, :] >= pad_B[:, None]
    pos_BP = col_P[None, :] - pad_B[:, None]
    return jnp.where(real_BP, pos_BP, 0), real_BP.astype(jnp.int32), jnp.where(real_BP, pos_BP, -1)


def feed(config: ModelConfig, variables, state: DecodeState, tokens_BT, positions_BT, kv_new_BT,
         segment_ids_BT=None) -> tuple[ModelOutput, DecodeState]:
    """One forward over T new tokens written to slots write_index..write_index+T-1; `kv_new_BT` is
    what those slots hold afterwards (their positions, or -1 for padding)."""
    kv_BS = jax.lax.dynamic_update_slice(state.kv_positions_BS, kv_new_BT.astype(jnp.int32), (0, state.write_index))
    with shd.activation_rules():
        kv_BS = nn.with_logical_constraint(kv_BS, ("batch", "length"))
        out = Transformer(config).apply(variables, tokens_BT, positions_BT, segment_ids_BT, cache=state.cache,
                                        view=CacheView(state.write_index, kv_BS), full_output=True)
    t = tokens_BT.shape[1]
    return out, DecodeState(out.cache, kv_BS, state.write_index + t, positions_BT[:, -1] + 1)


def prefill(config: ModelConfig, variables, tokens_BP, prompt_lengths_B, cache: ModelCache):
    """Writes the left-padded prompts into an empty cache: (ModelOutput over [B, P], DecodeState)."""
    b, s = tokens_BP.shape[0], jax.tree_util.tree_leaves(cache)[0].shape[-2]
    positions_BP, segment_ids_BP, kv_BP = prompt_layout(prompt_lengths_B, tokens_BP.shape[1])
    view = cache_lib.empty_view(b, s)
    state = DecodeState(cache, view.kv_positions_BS, view.write_index, jnp.zeros((b,), jnp.int32))
    return feed(config, variables, state, tokens_BP, positions_BP, kv_BP, segment_ids_BP)


def decode(config: ModelConfig, variables, state: DecodeState, tokens_BT):
    """T next tokens of every row, at positions next_position_B + 0..T-1."""
    positions_BT = state.next_position_B[:, None] + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)
    return feed(config, variables, state, tokens_BT, positions_BT, positions_BT, jnp.ones_like(tokens_BT))


def spread_expert_ids(config: ModelConfig, batch: int, length: int) -> jax.Array:
    """int32 [L_moe, B, length, k]: distinct ids per column, cycling over the experts."""
    k, e = config.moe.num_experts_per_tok, config.moe.n_routed_experts
    ids_TK = (jnp.arange(length, dtype=jnp.int32)[:, None] * k + jnp.arange(k, dtype=jnp.int32)) % e
    return jnp.broadcast_to(ids_TK, (config.num_moe_layers, batch, length, k))


class Sampler(NamedTuple):
    """How tokens are drawn (static under jit): temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, logits_BV, rng):
        return sampling.sample(logits_BV, rng, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


class Loop(NamedTuple):
    """The decode loop's carry; `tokens_BX[:, :count_B]` are each row's tokens so far."""

    state: DecodeState
    last_B: jax.Array  # the token fed next
    tokens_BX: jax.Array  # int32 [B, N + 1]
    count_B: jax.Array  # int32 tokens generated (EOS included)
    done_B: jax.Array  # bool
    step: jax.Array  # int32 decode forwards run
    stop: jax.Array  # bool: nothing left to do
    experts: Optional[jax.Array]  # int32 [L_moe, B, P + N, k] when recording


def start(config: ModelConfig, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, *, max_new_tokens: int,
          sampler: Sampler, record_experts: bool = False) -> Loop:
    """Prefill and token 0."""
    b, p = prompt_tokens_BP.shape
    n = max_new_tokens
    with shd.activation_rules():
        cache = cache_lib.init_cache(config, b, p + n, mtp=False)
    out, state = prefill(config, variables, prompt_tokens_BP, prompt_lengths_B, cache)
    tok_B = sampler(out.logits[:, -1], jax.random.fold_in(rng, 0))
    experts = None
    if record_experts and out.moe_stats is not None:
        experts = spread_expert_ids(config, b, p + n).at[:, :, :p].set(out.moe_stats.expert_ids_BTK)
    done_B = (tok_B == eos) | (n <= 1)
    tokens_BX = jnp.zeros((b, n + 1), jnp.int32).at[:, 0].set(tok_B)
    return Loop(state, tok_B, tokens_BX, jnp.ones((b,), jnp.int32), done_B, jnp.zeros((), jnp.int32),
                jnp.all(done_B) & (experts is None), experts)


def decode_step(config: ModelConfig, variables, loop: Loop, rng, eos, *, max_new_tokens: int,
                sampler: Sampler) -> Loop:
    """The loop body: feed each row's last token (completion token `step`, in slot P + step) and
    sample the next one."""
    prompt_columns = loop.state.write_index - loop.step
    out, state = decode(config, variables, loop.state, loop.last_B[:, None])
    experts = loop.experts
    if experts is not None:
        experts = jax.lax.dynamic_update_slice(experts, out.moe_stats.expert_ids_BTK.astype(jnp.int32),
                                               (0, 0, prompt_columns + loop.step, 0))
    tok_B = sampler(out.logits[:, -1], jax.random.fold_in(rng, loop.step + 1))
    index = loop.step + 1
    write_B = ~loop.done_B & (index < max_new_tokens)
    column_B = jax.lax.dynamic_slice_in_dim(loop.tokens_BX, index, 1, axis=1)[:, 0]
    tokens_BX = jax.lax.dynamic_update_slice_in_dim(loop.tokens_BX, jnp.where(write_B, tok_B, column_B)[:, None],
                                                    index, axis=1)
    count_B = loop.count_B + write_B.astype(jnp.int32)
    done_B = loop.done_B | (write_B & (tok_B == eos)) | (count_B >= max_new_tokens)
    # recording: stop once every row's last token has been fed too (its experts recorded)
    stop = jnp.all(loop.done_B) if experts is not None else jnp.all(done_B)
    return Loop(state, tok_B, tokens_BX, count_B, done_B, loop.step + 1, stop, experts)


def advance(config: ModelConfig, variables, loop: Loop, rng, eos, until, *, max_new_tokens: int,
            sampler: Sampler) -> Loop:
    """Decode steps on device until every row has stopped, or `until` steps in all (a traced int:
    chunked streaming reuses one compile)."""
    feeds = max_new_tokens - 1 + int(loop.experts is not None)  # recording feeds the last token too
    step = functools.partial(decode_step, config, variables, rng=rng, eos=eos, max_new_tokens=max_new_tokens,
                             sampler=sampler)
    return jax.lax.while_loop(lambda x: (x.step < jnp.minimum(feeds, until)) & ~x.stop, step, loop)


def finish(loop: Loop, max_new_tokens: int, pad_id) -> GenerationResult:
    n = max_new_tokens
    tokens_BN = jnp.where(jnp.arange(n)[None, :] < loop.count_B[:, None], loop.tokens_BX[:, :n], pad_id)
    replay = None if loop.experts is None else ReplayIds(loop.experts, ())
    return GenerationResult(tokens_BN, loop.count_B, replay, loop.step)


def _generate(config: ModelConfig, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, pad_id, *,
              max_new_tokens: int, sampler: Sampler, record_experts: bool) -> GenerationResult:
    kw = dict(max_new_tokens=max_new_tokens, sampler=sampler)
    variables = compute_variables(config, variables)
    loop = start(config, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, record_experts=record_experts, **kw)
    loop = advance(config, variables, loop, rng, eos, max_new_tokens, **kw)
    result = finish(loop, max_new_tokens, pad_id)
    if record_experts and result.replay is None:  # a model without MoE layers
        result = result._replace(replay=ReplayIds(None, ()))
    return result


_generate_jit = jax.jit(_generate, static_argnums=0, static_argnames=("max_new_tokens", "sampler", "record_experts"))


def check_prompts(config: ModelConfig, prompt_tokens_BP, prompt_lengths_B, max_new_tokens: int):
    if prompt_tokens_BP.ndim != 2 or prompt_lengths_B.shape != prompt_tokens_BP.shape[:1]:
        raise ValueError(f"prompt tokens must be [B, P] with lengths [B]; got {prompt_tokens_BP.shape} and "
                         f"{prompt_lengths_B.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    p = prompt_tokens_BP.shape[1]
    if p + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt columns ({p}) + max_new_tokens ({max_new_tokens}) exceed the model's context, "
                         f"max_position_embeddings={config.max_position_embeddings}")


def generate_tokens(model_config: ModelConfig, variables, prompt_tokens_BP, prompt_lengths_B, *, max_new_tokens: int,
                    rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
                    pad_id: Optional[int] = None, record_experts: bool = False) -> GenerationResult:
    """Completions of left-padded prompts (int32 [B, P], every length in [1, P]) in one jitted call.

    Temperature 0 is greedy. Stops a row at eos_id (kept, counted in its length) or after
    max_new_tokens; the call returns once every row has stopped. `pad_id` (default eos_id, or 0
    when there is none) fills each row after its end. Compiles once per (config, shapes, sampling
    settings); call it under `jax.set_mesh(mesh)` with sharded variables to shard the batch.
    """
    sampling.check(temperature, top_k, top_p)
    prompt_tokens_BP, prompt_lengths_B = jnp.asarray(prompt_tokens_BP, jnp.int32), jnp.asarray(prompt_lengths_B,
                                                                                              jnp.int32)
    check_prompts(model_config, prompt_tokens_BP, prompt_lengths_B, max_new_tokens)
    eos, pad = special_ids(eos_id, pad_id)
    return _generate_jit(model_config, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, pad,
                         max_new_tokens=int(max_new_tokens), sampler=Sampler(float(temperature), int(top_k),
                                                                             float(top_p)),
                         record_experts=bool(record_experts))


def special_ids(eos_id: Optional[int], pad_id: Optional[int]):
    """(eos, pad) as int32 scalars (traced: changing them does not recompile); no EOS is -1."""
    eos = -1 if eos_id is None else int(eos_id)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    return jnp.asarray(eos, jnp.int32), jnp.asarray(pad, jnp.int32)

"""Self-speculative decoding with the MTP modules (DeepSeek-V3 §2.2, §5.4.3).

V3 trains D = num_nextn_predict_layers MTP modules and notes they can be repurposed for speculative
decoding; it reports 85-90% acceptance of the second token and 1.8x tokens/s (§5.4.3). dsjax does:

    draft    MTP module k (k = 1..D) at the last verified position i, fed h^{k-1}_i (h^0 = the main
             model's post-final-norm hidden, h^{k-1} the previous module's output) and the
             embedding of t_{i+k} (the token just produced for k = 1, draft k-1 after), proposes
             draft k = argmax of its logits;
    verify   one main-model forward over [last token, draft 1..D] (D + 1 columns) with the cache;
             greedy accepts the longest prefix of drafts equal to the main argmax and appends the
             main model's next token, so each cycle emits 1..D+1 tokens and the output is exactly
             plain greedy decoding. With temperature > 0 a draft d is accepted with probability
             p(d) and a rejection resamples from p with d removed (speculative sampling with a
             deterministic draft; Leviathan et al. 2023), so samples follow the target p exactly;
    rollback slots of rejected drafts get kv position -1 (never attended again); the scalar write
             index moves to just past the most-accepting row, so rows that accepted less keep a
             hole of masked slots instead of a per-row write index;
    catch up the MTP modules run over the verify's D + 1 columns (each position with the token
             that follows it: accepted drafts, then the main model's token), which writes their
             caches at the accepted positions and yields the next cycle's drafts at each row's
             new last position: one MTP pass per cycle, no separate drafting forward.

MTP caches: module 1's entries depend only on verified tokens, so its cache is exact. Module k > 1
at the frontier also consumes drafts 1..k-1; such entries are kept and invalidated (kv -1) at the
next cycle if those drafts are rejected, leaving a hole the full-sequence MTP forward would not
have. This only changes draft quality, never the output. Every shape is static: the cache has
P + (N-1)(D+1) slots (P + N - 1 + D at batch 1, where no holes occur), and attention reads every
slot, so at batch > 1 the completion part of the cache costs up to (D+1)x the plain engine's.

Deviation: V3 gives no algorithm for its speculative decoding; this is vLLM's and SGLang's
MTP/EAGLE-style scheme restricted to a single chain of drafts (no tree).
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
from dsjax.inference import engine, sampling
from dsjax.model import CacheView, ModelCache, Transformer, compute_variables


class Loop(NamedTuple):
    """The speculative loop's carry; `tokens_BX[:, :count_B]` are each row's tokens so far."""

    state: engine.DecodeState  # main cache (+ MTP caches), main kv positions, write index, last position
    mtp_kv: tuple  # per module: int32 [B, S] kv positions of its own cache
    pending: tuple  # per module k (0-based): int32 [B, k] slots that used drafts 1..k (need index m)
    last_B: jax.Array  # last verified token (not yet in the main cache)
    drafts_BD: jax.Array
    tokens_BX: jax.Array  # [B, N + D + 1]
    count_B: jax.Array
    done_B: jax.Array
    step: jax.Array  # int32 verify cycles run
    drafted_B: jax.Array
    accepted_B: jax.Array


def _at_column(x_BT, col_B):
    return jnp.take_along_axis(x_BT, col_B.reshape((-1, 1) + (1,) * (x_BT.ndim - 2)), axis=1)[:, 0]


def mtp_pass(config: ModelConfig, variables, caches: tuple, mtp_kv: tuple, pending: tuple, accepted_prev_B,
             write_index, hidden_BTD, next_tokens_BT, positions_BT, kv_window_BT, segment_ids_BT, frontier_B,
             depth: int):
    """Runs MTP modules 0..depth-1 over a window of T columns written at `write_index`.

    `next_tokens_BT[:, j]` is the verified token after column j's position for j <= frontier_B;
    the drafts come from column frontier_B. Returns (caches, mtp_kv, pending, drafts [B, depth]).
    """
    b, t = next_tokens_BT.shape
    s = mtp_kv[0].shape[1]
    rows_B1 = jnp.arange(b)[:, None]
    cols_X = jnp.arange(t + depth)
    ext_BX = jnp.concatenate([next_tokens_BT, jnp.zeros((b, depth), jnp.int32)], axis=1)
    ext_BX = jnp.where(cols_X[None, :] <= frontier_B[:, None], ext_BX, 0)
    h_BTD = hidden_BTD
    new_caches, new_kv, new_pending, drafts = list(caches), list(mtp_kv), list(pending), []
    for k in range(depth):
        kv_BS = mtp_kv[k]
        if k and accepted_prev_B is not None:  # entries that consumed a rejected draft: never attend again
            need_K = jnp.arange(1, k + 1)
            stale_BK = (need_K[None, :] > accepted_prev_B[:, None]) & (pending[k] >= 0)
            kv_BS = kv_BS.at[rows_B1, jnp.where(stale_BK, pending[k], s)].set(-1, mode="drop")
        kv_BS = jax.lax.dynamic_update_slice(kv_BS, kv_window_BT, (0, write_index))
        with shd.activation_rules():
            kv_BS = nn.with_logical_constraint(kv_BS, ("batch", "length"))
            h_BTD, logits_BTV, new_caches[k] = Transformer(config).apply(
                variables, k, h_BTD, ext_BX[:, k:k + t], positions_BT, segment_ids_BT, cache=caches[k],
                view=CacheView(write_index, kv_BS), method=Transformer.mtp_step)
        draft_B = sampling.greedy(_at_column(logits_BTV, frontier_B))
        ext_BX = jnp.where(cols_X[None, :] == frontier_B[:, None] + k + 1, draft_B[:, None], ext_BX)
        drafts.append(draft_B)
        new_kv[k] = kv_BS
        if k:  # columns frontier-k+m (m = 1..k) used draft m
            col_BK = frontier_B[:, None] - k + jnp.arange(1, k + 1)[None, :]
            new_pending[k] = jnp.where(col_BK >= 0, write_index + col_BK, -1).astype(jnp.int32)
    return tuple(new_caches), tuple(new_kv), tuple(new_pending), jnp.stack(drafts, axis=1)


def accept(logits_BTV, drafts_BD, rng, sampler: engine.Sampler):
    """(accepted drafts a_B in 0..D, emitted tokens [B, D+1]: drafts 1..a, then the main model's token)."""
    b, t, v = logits_BTV.shape
    d = t - 1
    if sampler.temperature == 0.0:
        main_BT = sampling.greedy(logits_BTV.reshape(b * t, v)).reshape(b, t)
        a_B = jnp.cumprod(drafts_BD == main_BT[:, :d], axis=1).sum(1).astype(jnp.int32)
        return a_B, main_BT  # accepted drafts equal the main argmax
    u_key, sample_key = jax.random.split(rng)
    probs_BTV = sampling.probabilities(logits_BTV.reshape(b * t, v), temperature=sampler.temperature,
                                       top_k=sampler.top_k, top_p=sampler.top_p).reshape(b, t, v)
    p_draft_BD = jnp.take_along_axis(probs_BTV[:, :d], drafts_BD[..., None], axis=-1)[..., 0]
    ok_BD = jax.random.uniform(u_key, (b, d)) < p_draft_BD
    a_B = jnp.cumprod(ok_BD, axis=1).sum(1).astype(jnp.int32)
    residual_BTV = probs_BTV.at[:, :d].multiply(1.0 - jax.nn.one_hot(drafts_BD, v, dtype=jnp.float32))
    resampled_BT = jax.random.categorical(sample_key, jnp.log(residual_BTV), axis=-1).astype(jnp.int32)
    cols_T = jnp.arange(t)
    drafts_BT = jnp.concatenate([drafts_BD, jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted_BT = jnp.where(cols_T[None, :] < a_B[:, None], drafts_BT, _at_column(resampled_BT, a_B)[:, None])
    return a_B, emitted_BT


def cycle_step(config: ModelConfig, variables, spec: Loop, rng, eos, *, max_new_tokens: int,
               sampler: engine.Sampler) -> Loop:
    """One draft-verify-rollback cycle (the while-loop body)."""
    state, n, d = spec.state, max_new_tokens, spec.drafts_BD.shape[1]
    b = spec.last_B.shape[0]
    cols_T = jnp.arange(d + 1)
    w = state.write_index
    positions_BT = state.next_position_B[:, None] + cols_T[None, :]
    tokens_BT = jnp.concatenate([spec.last_B[:, None], spec.drafts_BD], axis=1)
    out, state = engine.feed(config, variables, state, tokens_BT, positions_BT, positions_BT,
                             jnp.ones_like(tokens_BT))
    a_B, emitted_BT = accept(out.logits, spec.drafts_BD, jax.random.fold_in(rng, spec.step + 1), sampler)

    active_B = ~spec.done_B
    is_eos_BT = (emitted_BT == eos) & (cols_T[None, :] <= a_B[:, None])
    emit_B = jnp.where(is_eos_BT.any(1), jnp.argmax(is_eos_BT, axis=1) + 1, a_B + 1)
    emit_B = jnp.where(active_B, jnp.minimum(emit_B, n - spec.count_B), 0)
    slot_BT = jnp.where(cols_T[None, :] < emit_B[:, None], spec.count_B[:, None] + cols_T[None, :],
                        spec.tokens_BX.shape[1])
    tokens_BX = spec.tokens_BX.at[jnp.arange(b)[:, None], slot_BT].set(emitted_BT, mode="drop")
    count_B = spec.count_B + emit_B
    hit_eos_B = (is_eos_BT & (cols_T[None, :] < emit_B[:, None])).any(1)
    done_B = spec.done_B | hit_eos_B | (count_B >= n)

    kv_window_BT = jnp.where(cols_T[None, :] <= a_B[:, None], positions_BT, -1)  # roll back rejected drafts
    kv_BS = jax.lax.dynamic_update_slice(state.kv_positions_BS, kv_window_BT, (0, w))
    caches, mtp_kv, pending, drafts_BD = mtp_pass(
        config, variables, state.cache.mtp, spec.mtp_kv, spec.pending, a_B, w, out.hidden, emitted_BT,
        positions_BT, kv_window_BT, jnp.ones_like(tokens_BT), a_B, d)
    advance_by = 1 + jnp.max(jnp.where(active_B, a_B, 0))
    state = engine.DecodeState(state.cache._replace(mtp=caches), kv_BS, w + advance_by,
                               spec.state.next_position_B + a_B + 1)
    return Loop(state, mtp_kv, pending, _at_column(emitted_BT, a_B), drafts_BD, tokens_BX, count_B, done_B,
                 spec.step + 1, spec.drafted_B + jnp.where(active_B, d, 0),
                 spec.accepted_B + jnp.where(active_B, a_B, 0))


def cache_length(batch: int, prompt_columns: int, max_new_tokens: int, depth: int) -> int:
    """Slots a speculative run can touch: every cycle writes D + 1 and advances by 1 + max accepted."""
    if batch == 1:
        return prompt_columns + max_new_tokens - 1 + depth
    return prompt_columns + max(max_new_tokens - 1, 1) * (depth + 1)


def start(config: ModelConfig, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, *, max_new_tokens: int,
          sampler: engine.Sampler, depth: int) -> Loop:
    """Prefill, token 0, and the MTP pass over the prompt that gives the first drafts."""
    b, p = prompt_tokens_BP.shape
    n, d = max_new_tokens, depth
    s = cache_length(b, p, n, d)
    with shd.activation_rules():
        cache: ModelCache = cache_lib.init_cache(config, b, s, mtp=True)
    out, state = engine.prefill(config, variables, prompt_tokens_BP, prompt_lengths_B, cache)
    tok_B = sampler(out.logits[:, -1], jax.random.fold_in(rng, 0))
    positions_BP, segment_ids_BP, kv_BP = engine.prompt_layout(prompt_lengths_B, p)
    next_BP = jnp.concatenate([prompt_tokens_BP[:, 1:], tok_B[:, None]], axis=1)
    empty_kv = tuple(jnp.full((b, s), -1, jnp.int32) for _ in range(d))
    pending = tuple(jnp.full((b, k), -1, jnp.int32) for k in range(d))
    caches, mtp_kv, pending, drafts_BD = mtp_pass(
        config, variables, state.cache.mtp, empty_kv, pending, None, jnp.zeros((), jnp.int32), out.hidden, next_BP,
        positions_BP, kv_BP, segment_ids_BP, jnp.full((b,), p - 1, jnp.int32), d)
    state = state._replace(cache=state.cache._replace(mtp=caches))
    done_B = (tok_B == eos) | (n <= 1)
    tokens_BX = jnp.zeros((b, n + d + 1), jnp.int32).at[:, 0].set(tok_B)
    zeros_B = jnp.zeros((b,), jnp.int32)
    return Loop(state, mtp_kv, pending, tok_B, drafts_BD, tokens_BX, jnp.ones((b,), jnp.int32), done_B,
                jnp.zeros((), jnp.int32), zeros_B, zeros_B)


def advance(config: ModelConfig, variables, spec: Loop, rng, eos, until, *, max_new_tokens: int,
            sampler: engine.Sampler) -> Loop:
    """Verify cycles on device until every row has stopped, or `until` cycles in all (traced)."""
    body = functools.partial(cycle_step, config, variables, rng=rng, eos=eos, max_new_tokens=max_new_tokens,
                             sampler=sampler)
    limit = jnp.minimum(max_new_tokens - 1, until)
    return jax.lax.while_loop(lambda x: (x.step < limit) & ~jnp.all(x.done_B), body, spec)


def finish(spec: Loop, max_new_tokens: int, pad_id) -> engine.GenerationResult:
    n = max_new_tokens
    tokens_BN = jnp.where(jnp.arange(n)[None, :] < spec.count_B[:, None], spec.tokens_BX[:, :n], pad_id)
    return engine.GenerationResult(tokens_BN, spec.count_B, None, spec.step, spec.drafted_B, spec.accepted_B)


def _generate(config: ModelConfig, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, pad_id, *,
              max_new_tokens: int, sampler: engine.Sampler, depth: int) -> engine.GenerationResult:
    kw = dict(max_new_tokens=max_new_tokens, sampler=sampler)
    variables = compute_variables(config, variables)
    spec = start(config, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, depth=depth, **kw)
    spec = advance(config, variables, spec, rng, eos, max_new_tokens, **kw)
    return finish(spec, max_new_tokens, pad_id)


_generate_jit = jax.jit(_generate, static_argnums=0, static_argnames=("max_new_tokens", "sampler", "depth"))


def generate_tokens(model_config: ModelConfig, variables, prompt_tokens_BP, prompt_lengths_B, *, max_new_tokens: int,
                    rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
                    pad_id: Optional[int] = None, depth: Optional[int] = None) -> engine.GenerationResult:
    """`engine.generate_tokens` with MTP drafting: the same outputs for greedy (and the same
    distribution when sampling), plus `drafted`/`accepted` counts per row (`engine.acceptance_rate`).
    `depth` MTP modules draft per cycle (default: all of them)."""
    modules = model_config.mtp.num_nextn_predict_layers
    if modules < 1:
        raise ValueError("speculative decoding drafts with the MTP modules, and this config has none "
                         "(mtp.num_nextn_predict_layers=0)")
    depth = modules if depth is None else int(depth)
    if not 1 <= depth <= modules:
        raise ValueError(f"depth must be in [1, mtp.num_nextn_predict_layers={modules}], got {depth}")
    sampling.check(temperature, top_k, top_p)
    prompt_tokens_BP, prompt_lengths_B = jnp.asarray(prompt_tokens_BP, jnp.int32), jnp.asarray(prompt_lengths_B,
                                                                                              jnp.int32)
    engine.check_prompts(model_config, prompt_tokens_BP, prompt_lengths_B, max_new_tokens + depth)
    eos, pad = engine.special_ids(eos_id, pad_id)
    return _generate_jit(model_config, variables, prompt_tokens_BP, prompt_lengths_B, rng, eos, pad,
                         max_new_tokens=int(max_new_tokens), depth=depth,
                         sampler=engine.Sampler(float(temperature), int(top_k), float(top_p)))


def oracle_draft_variables(variables):
    """Variables under which every MTP module drafts exactly what the main model will predict.

    Zeroes every attention output, dense FFN and expert down-projection (main layers and MTP
    layers alike), so the residual stream is the token embedding and the main model's next token
    depends only on the current one; each MTP eh_proj passes its (unit-scaled) embedding half
    through and its output norm copies the final norm's scale. MTP module k at position i then
    sees only Emb(t_{i+k}) and its logits are the main model's logits for t_{i+k+1} up to a
    positive factor (norm(norm(x)) vs norm(x)): acceptance is 100%. Every matmul still runs, so
    timings are real (benchmarks use this for the speculative ceiling; tests for acceptance).
    """
    def leaf(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        if "o" in names[:-1] or "down" in names:  # attention out, dense/shared FFN down, expert down
            return jnp.zeros_like(x)
        if "eh_proj" in names:  # [2D, D]: embedding half first
            dim = x.shape[-1]
            return jnp.concatenate([jnp.eye(dim, dtype=x.dtype), jnp.zeros((dim, dim), x.dtype)], axis=0)
        if "enorm" in names:
            return jnp.ones_like(x)
        return x

    params = jax.tree_util.tree_map_with_path(leaf, variables["params"])
    for name in params:
        if name.startswith("mtp_"):
            params[name] = {**params[name], "norm": {"scale": params["final_norm"]["scale"]}}
    return {**variables, "params": params}

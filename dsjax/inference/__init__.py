"""Inference: the latent KV cache, batched generation and MTP speculative decoding.

    from dsjax import inference
    new_tokens = inference.generate(config, variables, prompts, max_new_tokens=64, temperature=0.0,
                                    top_k=0, top_p=1.0, speculative=False, seed=0)

`generate` takes token-id lists of any lengths and returns one list of generated ids per prompt,
ending at (and including) config.eos_token_id when it was generated. Temperature 0 is greedy,
equal to the argmax loop over `Transformer.apply`, with or without `speculative=True` (MTP drafts
verified by the main model, dsjax.inference.speculative). Below it, `generate_tokens` is the
batched engine (left-padded arrays in, fixed-shape arrays out, one jit) that GRPO rollouts use.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np

from dsjax.config import ModelConfig
from dsjax.inference import cache, engine, sampling
from dsjax.inference import speculative as speculative_lib  # `generate` has a `speculative` flag
from dsjax.inference.cache import bytes_per_token_per_layer, cache_bytes, init_cache, values_per_token_per_layer
from dsjax.inference.engine import DecodeState, GenerationResult, Sampler, acceptance_rate, generate_tokens

speculative = speculative_lib  # the submodule, as `inference.speculative`

__all__ = ["generate", "generate_tokens", "GenerationResult", "DecodeState", "Sampler", "acceptance_rate",
           "init_cache", "values_per_token_per_layer", "bytes_per_token_per_layer", "cache_bytes", "cache", "engine",
           "sampling", "speculative"]

log = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 8  # prompt columns are padded to a power of two >= this: few compiles


def _prompt_columns(longest: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (longest - 1).bit_length())


def _batch_multiple() -> int:
    """Rows must divide over the active mesh's batch axes ('data', 'expert'); 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return int(np.prod([mesh.shape.get(a, 1) for a in ("data", "expert")]))


def generate(config: ModelConfig, variables, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, speculative: bool = False,
             seed: int = 0) -> list[list[int]]:
    """Generated token ids for each prompt (a list of ids), ending at EOS if one was generated."""
    rows = [[int(t) for t in p] for p in prompts]
    if not rows:
        return []
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if min(row) < 0 or max(row) >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={config.vocab_size})")
        if len(row) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's context, max_position_embeddings={config.max_position_embeddings}")
    longest = max(len(r) for r in rows)
    p = min(_prompt_columns(longest), max(longest, config.max_position_embeddings - max_new_tokens))
    multiple = _batch_multiple()
    b = -(-len(rows) // multiple) * multiple
    padded = rows + [rows[0]] * (b - len(rows))  # filler rows keep the batch divisible over the mesh
    pad = config.eos_token_id if config.eos_token_id is not None else 0
    tokens = np.full((b, p), pad, np.int32)
    for i, row in enumerate(padded):
        tokens[i, p - len(row):] = row
    lengths = np.asarray([len(r) for r in padded], np.int32)
    kwargs = dict(max_new_tokens=max_new_tokens, rng=jax.random.PRNGKey(seed), temperature=temperature,
                  top_k=top_k, top_p=top_p, eos_id=config.eos_token_id)
    if speculative:
        result = speculative_lib.generate_tokens(config, variables, tokens, lengths, **kwargs)
        log.info("speculative decoding: %.1f%% of MTP drafts accepted, %d verify cycles",
                 100 * acceptance_rate(result), int(result.steps))
    else:
        result = generate_tokens(config, variables, tokens, lengths, **kwargs)
    out, out_lengths = jax.device_get((result.tokens, result.lengths))
    return [out[i, :out_lengths[i]].tolist() for i in range(len(rows))]


"""Rollouts as fixed-shape update batches: prompts in, the sequences GRPO trains on out.

A GRPO step samples G completions for each of P prompts (DeepSeekMath §4.1) and then scores and
trains on them. dsjax lays every sampled sequence out in one fixed shape, so the update, the
log-prob forwards and the engine each compile once per run:

    index     0 ........ Lp-1 | Lp ....................... Lp+Lc-1
    tokens    pad.. bos prompt | completion (EOS included) pad..
    segment   0..   1 ...... 1 | 1 ..................... 1 0..
    position  0..   0 ... n-1  | n ................. n+c-1 0..

Lp = grpo.max_prompt_length (prompts are left-padded, as the engine takes them) and
Lc = grpo.max_completion_length (completions are right-padded), so B × Lc is the same constant
every step, as dr_grpo's normalizer needs. Padding gets segment id 0: real tokens never attend to
it and the MoE statistics skip it. Positions count real tokens from 0, so a left-padded prompt
sees the same rotary phases as an unpadded one (and as the engine gave it). `completion_mask`
[B, Lc] is 1 on the tokens the policy sampled, the EOS included; their log-probs come from the
logits one position to the left (`logprobs.completion_logprobs`).

Prompts are the embedded arithmetic task's, drawn deterministically from the step
(`step_problems`), encoded as `[bos] + prompt` exactly as the pretraining documents begin.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dsjax.config import ConfigError, DataConfig
from dsjax.data.arithmetic import Problem, train_problem
from dsjax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    """One rollout's sequences, [B, Lp + Lc] (host numpy; module docstring for the layout)."""

    tokens: np.ndarray  # int32 [B, L]
    positions: np.ndarray  # int32 [B, L]
    segment_ids: np.ndarray  # int32 [B, L]: 1 on prompt and completion tokens, 0 on padding
    completion_mask: np.ndarray  # float32 [B, Lc]: 1 on sampled tokens (EOS included)

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - self.completion_mask.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def step_problems(data: DataConfig, step: int, prompts_per_step: int) -> list[Problem]:
    """The prompts of GRPO step `step` (1-based): training problems (step-1)·P .. step·P - 1."""
    first = (step - 1) * prompts_per_step
    return [train_problem(data, first + i) for i in range(prompts_per_step)]


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], max_prompt_length: int):
    """`[bos] + encode(prompt)`, left-padded with pad_id: (tokens int32 [B, Lp], lengths int32 [B])."""
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    rows = [head + tokenizer.encode(p) for p in prompts]
    longest = max((len(r) for r in rows), default=0)
    if longest > max_prompt_length:
        raise ConfigError(f"config field 'grpo.max_prompt_length': a prompt takes {longest} tokens "
                          f"(bos included), more than max_prompt_length={max_prompt_length}")
    tokens = np.full((len(rows), max_prompt_length), tokenizer.pad_id, np.int32)
    for i, r in enumerate(rows):
        if r:
            tokens[i, max_prompt_length - len(r):] = r
    return tokens, np.asarray([len(r) for r in rows], np.int32)


def build_update_batch(prompt_tokens_BP, prompt_lengths_B, completion_tokens_BC, completion_lengths_B,
                       max_completion_length: int, pad_id: int) -> UpdateBatch:
    """Left-padded prompts + completions -> the fixed [B, Lp + max_completion_length] layout.

    Completion row i keeps its first completion_lengths[i] tokens (what the engine sampled, EOS
    included); the rest, and any columns beyond, become pad_id with segment id 0.
    """
    prompt_tokens_BP = np.asarray(prompt_tokens_BP, np.int32)
    prompt_lengths_B = np.asarray(prompt_lengths_B, np.int32)
    completion_tokens_BC = np.asarray(completion_tokens_BC, np.int32)
    completion_lengths_B = np.asarray(completion_lengths_B, np.int32)
    b, lp = prompt_tokens_BP.shape
    c = completion_tokens_BC.shape[1]
    if completion_tokens_BC.shape[0] != b or prompt_lengths_B.shape != (b,) or completion_lengths_B.shape != (b,):
        raise ValueError(f"build_update_batch: batch sizes disagree: prompts {prompt_tokens_BP.shape}, "
                         f"prompt lengths {prompt_lengths_B.shape}, completions {completion_tokens_BC.shape}, "
                         f"completion lengths {completion_lengths_B.shape}")
    if c > max_completion_length or (completion_lengths_B > c).any() or (completion_lengths_B < 0).any():
        raise ValueError(f"build_update_batch: completions [B, {c}] with lengths up to "
                         f"{completion_lengths_B.max(initial=0)} do not fit max_completion_length="
                         f"{max_completion_length}")
    if (prompt_lengths_B > lp).any() or (prompt_lengths_B < 1).any():
        raise ValueError(f"build_update_batch: prompt lengths must be in [1, {lp}], got {prompt_lengths_B}")

    col_C = np.arange(max_completion_length)[None, :]
    mask_BC = col_C < completion_lengths_B[:, None]
    completion_BC = np.full((b, max_completion_length), pad_id, np.int32)
    completion_BC[:, :c] = completion_tokens_BC
    completion_BC = np.where(mask_BC, completion_BC, pad_id)

    col_P = np.arange(lp)[None, :]
    prompt_real_BP = col_P >= lp - prompt_lengths_B[:, None]
    prompt_BP = np.where(prompt_real_BP, prompt_tokens_BP, pad_id)
    prompt_pos_BP = np.where(prompt_real_BP, col_P - (lp - prompt_lengths_B[:, None]), 0)
    completion_pos_BC = np.where(mask_BC, prompt_lengths_B[:, None] + col_C, 0)
    return UpdateBatch(
        tokens=np.concatenate([prompt_BP, completion_BC], axis=1).astype(np.int32),
        positions=np.concatenate([prompt_pos_BP, completion_pos_BC], axis=1).astype(np.int32),
        segment_ids=np.concatenate([prompt_real_BP, mask_BC], axis=1).astype(np.int32),
        completion_mask=mask_BC.astype(np.float32),
    )


def decode_completions(tokenizer: Tokenizer, completion_tokens_BC, completion_lengths_B) -> list[str]:
    """Each completion's text (its first `length` tokens; specials such as EOS dropped)."""
    tokens = np.asarray(completion_tokens_BC)
    return [tokenizer.decode(tokens[i, :n].tolist()) for i, n in enumerate(np.asarray(completion_lengths_B))]

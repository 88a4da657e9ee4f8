"""The embedded synthetic task: arithmetic problems with worked solutions in the R1 format.

DeepSeek-R1 (§2.2.1) trains R1-Zero with the template "<think> reasoning process here </think>
<answer> answer here </answer>" and rule-based rewards (§2.2.2) that check the answer and the tags.
dsjax needs such a task with no download, for pretraining the tiny models, for GRPO and for its
held-out accuracy, so it generates one:

    prompt      "What is 37 + 48 - 12?\\n"
    completion  "<think>37 + 48 = 85. 85 - 12 = 73.</think> <answer>73</answer>"

Problems have 2..`data.max_terms` operands in [0, `data.max_operand`] joined by operators drawn
from `data.arithmetic_ops` ("+", "-", "*"). The worked solution follows precedence: products first,
left to right, then sums and differences left to right, one "a op b = c." step each. Answers may be
negative. A training document is prompt + completion (the pipeline adds bos and eos).

Determinism: problem `index` of a stream is a pure function of (split, seed, index) and the
difficulty fields. Draws come from blake2b in counter mode rather than `random`/numpy, whose
streams may change between versions; the same problem text comes back on any machine, forever.

The split is by content, so a problem text can never be in both: a prompt is held out iff the
blake2b hash of its text falls in one of `HELDOUT_BUCKETS` buckets (1 in 10 prompts). Each stream
draws until it gets a problem of its own class. The held-out problems are a fixed test set:
`heldout_problem(config, i)` uses `HELDOUT_SEED`, not `data.seed`, so held-out accuracy compares
across runs with different seeds; training problems follow `data.seed`. Either stream may repeat a
problem (the space is finite: about 4M texts at the defaults); the two never share one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator, Optional

from dsjax.config import ConfigError, DataConfig

OPERATORS = ("+", "-", "*")
SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 10  # a prompt is held out iff hash(prompt) % HELDOUT_BUCKETS == 0
HELDOUT_SEED = 0  # the held-out stream ignores data.seed: one fixed test set
MAX_DRAWS = 10_000  # per problem; only a near-empty problem space runs out


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str  # "What is 37 + 48 - 12?\n"
    completion: str  # "<think>…</think> <answer>73</answer>"
    answer: str  # "73"

    @property
    def text(self) -> str:
        """The training document (before bos/eos)."""
        return self.prompt + self.completion


class _Draws:
    """Uniform integers from blake2b(key, counter): stable across Python and numpy versions."""

    def __init__(self, *key: object):
        self._key = repr(key).encode()
        self._counter = 0

    def below(self, n: int) -> int:
        digest = hashlib.blake2b(self._key, digest_size=8, salt=self._counter.to_bytes(16, "little")).digest()
        self._counter += 1
        return int.from_bytes(digest, "little") % n  # bias < n / 2**64: immaterial


def is_heldout(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out class (by content, so never to both splits)."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8, person=b"dsjax-heldout").digest()
    return int.from_bytes(digest, "little") % HELDOUT_BUCKETS == 0


def solve(operands: list[int], operators: list[str]) -> tuple[list[str], int]:
    """Worked steps ("a op b = c.") and the value, products first, then left to right."""
    values, ops, steps = list(operands), list(operators), []
    i = 0
    while i < len(ops):
        if ops[i] == "*":
            product = values[i] * values[i + 1]
            steps.append(f"{values[i]} * {values[i + 1]} = {product}.")
            values[i:i + 2] = [product]
            del ops[i]
        else:
            i += 1
    total = values[0]
    for op, value in zip(ops, values[1:]):
        result = total + value if op == "+" else total - value
        steps.append(f"{total} {op} {value} = {result}.")
        total = result
    return steps, total


def _draw(draws: _Draws, max_operand: int, max_terms: int, ops: tuple[str, ...]) -> Problem:
    n = 2 + draws.below(max_terms - 1)
    operands = [draws.below(max_operand + 1) for _ in range(n)]
    operators = [ops[draws.below(len(ops))] for _ in range(n - 1)]
    expression = str(operands[0]) + "".join(f" {op} {x}" for op, x in zip(operators, operands[1:]))
    steps, value = solve(operands, operators)
    completion = f"<think>{' '.join(steps)}</think> <answer>{value}</answer>"
    return Problem(prompt=f"What is {expression}?\n", completion=completion, answer=str(value))


def _check_difficulty(max_operand: int, max_terms: int, ops: tuple[str, ...]) -> None:
    if max_operand < 1:
        raise ConfigError(f"config field 'data.max_operand': must be >= 1, got {max_operand}")
    if max_terms < 2:
        raise ConfigError(f"config field 'data.max_terms': a problem needs >= 2 terms, got {max_terms}")
    if not ops or any(op not in OPERATORS for op in ops):
        raise ConfigError(f"config field 'data.arithmetic_ops': must be a non-empty subset of {OPERATORS}, "
                          f"got {ops!r}")


def problem(seed: int, index: int, split: str = "train", *, max_operand: int = 99, max_terms: int = 3,
            ops: tuple[str, ...] = ("+", "-")) -> Problem:
    """Problem `index` of the (`split`, `seed`) stream: the first draw whose prompt is in `split`'s class."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ops = tuple(ops)
    _check_difficulty(max_operand, max_terms, ops)
    draws = _Draws(split, seed, index)
    want_heldout = split == "heldout"
    for _ in range(MAX_DRAWS):
        p = _draw(draws, max_operand, max_terms, ops)
        if is_heldout(p.prompt) == want_heldout:
            return p
    raise ConfigError(f"config fields 'data.max_operand'={max_operand}, 'data.max_terms'={max_terms}, "
                      f"'data.arithmetic_ops'={ops}: no {split} problem in {MAX_DRAWS} draws; the problem "
                      "space is too small to split")


def _difficulty(config: DataConfig) -> dict:
    return dict(max_operand=config.max_operand, max_terms=config.max_terms, ops=tuple(config.arithmetic_ops))


def train_problem(config: DataConfig, index: int) -> Problem:
    """Training problem `index` (any index >= 0) of the `data.seed` stream."""
    return problem(config.seed, index, "train", **_difficulty(config))


def heldout_problem(config: DataConfig, index: int) -> Problem:
    """Held-out problem `index`; the held-out split is indices [0, data.heldout_size)."""
    return problem(HELDOUT_SEED, index, "heldout", **_difficulty(config))


def train_problems(config: DataConfig, start: int = 0) -> Iterator[Problem]:
    """Training problems start, start+1, …, without end (a GRPO loop checkpoints its index)."""
    index = start
    while True:
        yield train_problem(config, index)
        index += 1


def heldout_problems(config: DataConfig, n: Optional[int] = None) -> list[Problem]:
    """The first `n` held-out problems (default data.heldout_size); any n stays disjoint from training."""
    n = config.heldout_size if n is None else n
    return [heldout_problem(config, i) for i in range(n)]

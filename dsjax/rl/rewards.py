"""Rule-based rewards for GRPO, and user reward functions run in killable worker processes.

DeepSeek-R1 §2.2.2 trains R1-Zero with two rule-based rewards and no neural reward model:
an *accuracy* reward (the final answer, "in a specified format (e.g., within a box)", is checked
against the reference) and a *format* reward (the reasoning is put between `<think>` and
`</think>`). The paper gives no grader code; dsjax fixes the rules in DESIGN.md:

1. `format_reward(completion)` is 1.0 only for `<think>…</think>` then `<answer>…</answer>`, each
   tag exactly once, in that order, with nothing but whitespace around and between the blocks.
2. `accuracy_reward(completion, answer)` takes the content of the single `<answer>` block (two or
   more blocks, or an unclosed one, score 0.0); with no `<answer>` tag, the last `\\boxed{…}`
   (nested braces allowed; `\\{` and `\\}` are literal). Both sides are normalized (whitespace,
   `,`/`_` thousands separators and one leading `+` removed) and match as exact strings or as
   equal finite floats ("42" = "42.0" = "4.2e1"; "1/2" ≠ "0.5"; case-sensitive; nan/inf never
   match). An empty answer, or none, scores 0.0.

Where dsjax deviates from (or adds to) the paper's description:
- No symbolic equivalence (no sympy or math-verify): a float grammar is the only equivalence, so
  graders never evaluate text and every call is bounded (TRL and OpenRLHF need SIGALRM timeouts,
  which only work on the main thread).
- A separator is removed only where it groups thousands (a digit before, exactly three digits
  after), so "1,234" = "1234" but the tuple "1,2" ≠ "12".
- An `<answer>` block whose whole content is one `\\boxed{X}` is read as X.
- Inputs are length-capped: a completion over `MAX_COMPLETION_CHARS`, or an answer longer than
  `MAX_ANSWER_CHARS` after normalization, scores 0.0; non-str inputs score 0.0. Nothing raises.

User reward functions (`"module:function"`, called as `fn(completion, answer) -> float`) are
trusted code but may hang or crash: `RewardRunner` runs them in processes started with
multiprocessing's "spawn" context, with a per-call timeout. A call that times out, raises, kills
its worker or returns a non-finite or non-numeric value scores 0.0 and is counted; a hung worker
is killed and replaced. This is isolation against bugs, not a security sandbox. Built-in rewards
run in-process.
"""

from __future__ import annotations

import collections
import importlib
import math
import multiprocessing
import multiprocessing.connection
import re
import time
from typing import Callable, Sequence

MAX_COMPLETION_CHARS = 1_000_000  # ~250k tokens: far above any max_completion_length
MAX_ANSWER_CHARS = 1_000  # normalized answer or reference
MAX_BOXED_CHARS = 10_000  # raw span searched for the brace closing the last \boxed{
MAX_FLOAT_CHARS = 100  # float() only ever sees strings this short

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOXED_OPEN = "\\boxed{"
_INFINITY_SYMBOLS = frozenset({"∞", "\\infty", "\\inf"})

# Fixed-width lookarounds and an unambiguous grammar: both linear, no backtracking blow-up.
_THOUSANDS_SEP = re.compile(r"(?<=\d)[,_](?=\d{3}(?!\d))", re.ASCII)
_FLOAT = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def format_reward(completion: str) -> float:
    """1.0 for exactly `<think>…</think><answer>…</answer>` (whitespace around/between), else 0.0."""
    try:
        return 1.0 if _is_r1_format(completion) else 0.0
    except Exception:  # noqa: BLE001 — a reward never raises into the trainer
        return 0.0


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals the reference answer (module rules), else 0.0."""
    try:
        return 1.0 if _match(_normalize(_extract_answer(completion)), _normalize(answer)) else 0.0
    except Exception:  # noqa: BLE001 — a reward never raises into the trainer
        return 0.0


def _is_r1_format(text) -> bool:
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return False
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    if any(text.count(tag) != 1 for tag in tags):
        return False
    i0, i1, i2, i3 = (text.find(tag) for tag in tags)
    if not i0 < i1 < i2 < i3:
        return False
    gaps = (text[:i0], text[i1 + len(THINK_CLOSE) : i2], text[i3 + len(ANSWER_CLOSE) :])
    return all(not gap or gap.isspace() for gap in gaps)


def _extract_answer(text) -> str | None:
    """The single <answer> block's content, else (no <answer> at all) the last \\boxed{…}."""
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return None
    n_open = text.count(ANSWER_OPEN)
    if n_open > 1:
        return None
    if n_open == 1:
        start = text.find(ANSWER_OPEN) + len(ANSWER_OPEN)
        end = text.find(ANSWER_CLOSE, start)
        if end < 0:
            return None
        content = text[start:end].strip()
        if content.startswith(BOXED_OPEN):
            inner, close = _boxed_content(content, 0)
            if inner is not None and close == len(content) - 1:
                return inner
        return content
    start = text.rfind(BOXED_OPEN)
    return None if start < 0 else _boxed_content(text, start)[0]


def _boxed_content(text: str, start: int) -> tuple[str | None, int]:
    """Content of the \\boxed{ at `start` up to its matching brace, and that brace's index."""
    depth, i = 1, start + len(BOXED_OPEN)
    body_start, limit = i, min(len(text), i + MAX_BOXED_CHARS)
    while i < limit:
        c = text[i]
        if c == "\\":
            i += 2  # \{ and \} are literal braces; \\ is one escaped backslash
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[body_start:i], i
        i += 1
    return None, -1


def _normalize(text) -> str | None:
    """Whitespace, thousands separators and one leading '+' removed; None if empty or too long."""
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return None
    text = "".join(text.split())
    if len(text) > MAX_ANSWER_CHARS:
        return None
    text = _THOUSANDS_SEP.sub("", text)
    if text.startswith("+"):
        text = text[1:]
    return text or None


def _match(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None or _non_finite(predicted) or _non_finite(reference):
        return False
    if predicted == reference:
        return True
    a, b = _strict_float(predicted), _strict_float(reference)
    return a is not None and b is not None and a == b


def _non_finite(text: str) -> bool:
    """True for what float() reads as nan or ±inf ("nan", "-Infinity", "1e999", …), ∞ and \\infty."""
    if len(text) > MAX_FLOAT_CHARS:
        return False
    if text.lstrip("+-") in _INFINITY_SYMBOLS:
        return True
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _strict_float(text: str) -> float | None:
    """A finite float for plain ASCII decimal or scientific notation (no nan, inf, unicode, _, or +)."""
    if len(text) > MAX_FLOAT_CHARS or not _FLOAT.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- user reward fns

BUILTIN_REWARDS: dict[str, Callable[[str, str], float]] = {
    "accuracy": accuracy_reward,
    "format": lambda completion, answer: format_reward(completion),
}


def load_reward_fn(spec: str) -> Callable[[str, str], float]:
    """Imports `fn` from "package.module:fn" (attribute path may be dotted); errors name the spec."""
    module_name, sep, attr_path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"reward function spec {spec!r}: expected 'module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise ValueError(f"reward function spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function spec {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function spec {spec!r}: {attr_path!r} is not callable")
    return obj


def _worker_main(conn, specs: Sequence[str]) -> None:
    """Worker process: load every user fn, report ready, then answer (spec, completion, answer)."""
    fns = {spec: load_reward_fn(spec) for spec in specs}
    conn.send(("ready", None))
    while True:
        task = conn.recv()
        if task is None:
            return
        spec, completion, answer = task
        try:
            value = float(fns[spec](completion, answer))
            conn.send(("ok", value) if math.isfinite(value) else ("error", f"non-finite reward {value}"))
        except (Exception, SystemExit) as e:  # noqa: BLE001 — any failure scores 0 in the parent
            conn.send(("error", f"{type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, ctx, specs: Sequence[str]):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, tuple(specs)), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (completion index, deadline)
        self.started = time.monotonic()

    def kill(self) -> None:
        self.process.terminate()
        self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1.0)
        self.conn.close()


class RewardRunner:
    """Scores completions with named rewards: "accuracy", "format", or user "module:function".

    `score(completions, answers)` returns {name: [float per completion]} in input order. User
    functions run in `num_workers` spawned processes (started lazily) with `timeout_s` per call;
    `timeouts[name]` and `errors[name]` count calls that scored 0.0 for those reasons (cumulative;
    `last_error[name]` says what went wrong last). Use as a context manager, or call close().
    """

    def __init__(self, names: Sequence[str], *, timeout_s: float = 10.0, num_workers: int = 2,
                 startup_timeout_s: float = 120.0):
        if isinstance(names, str):
            raise TypeError(f"RewardRunner takes a sequence of reward names, got the string {names!r}")
        if timeout_s <= 0 or num_workers < 1:
            raise ValueError(f"RewardRunner: timeout_s must be > 0 and num_workers >= 1, "
                             f"got timeout_s={timeout_s}, num_workers={num_workers}")
        self.names = tuple(names)
        self.user_specs = tuple(n for n in self.names if n not in BUILTIN_REWARDS)
        for spec in self.user_specs:
            load_reward_fn(spec)  # fail fast, in the parent, with an error naming the spec
        self.timeout_s, self.num_workers, self.startup_timeout_s = timeout_s, num_workers, startup_timeout_s
        self.timeouts = collections.Counter({n: 0 for n in self.names})
        self.errors = collections.Counter({n: 0 for n in self.names})
        self.last_error: dict[str, str] = {}  # name -> last error message or "timeout"/"died"
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> dict[str, list[float]]:
        if len(completions) != len(answers):
            raise ValueError(f"RewardRunner.score: {len(completions)} completions but {len(answers)} answers")
        out = {}
        for name in self.names:
            if name in BUILTIN_REWARDS:
                out[name] = [BUILTIN_REWARDS[name](c, a) for c, a in zip(completions, answers)]
            else:
                out[name] = self._score_user(name, completions, answers)
        return out

    def _score_user(self, spec: str, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.user_specs))
        scores = [0.0] * len(completions)
        pending = collections.deque(range(len(completions)))
        while pending or any(w.task for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    w.conn.send((spec, completions[i], answers[i]))
                    w.task = (i, time.monotonic() + self.timeout_s)
            waiting = [w for w in self._workers if not w.ready or w.task]
            deadlines = [w.task[1] if w.task else w.started + self.startup_timeout_s for w in waiting]
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            ready_conns = multiprocessing.connection.wait([w.conn for w in waiting], timeout=wait_s)
            now = time.monotonic()
            for k, w in enumerate(waiting):
                if w.conn in ready_conns:
                    try:
                        status, value = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (os._exit, segfault, OOM kill)
                        status, value = "died", None
                elif now >= deadlines[k]:
                    status, value = "timeout", None
                else:
                    continue
                if status == "ready":
                    w.ready = True
                    continue
                if w.task is None:  # a fresh worker failed to start: infrastructure, not a score
                    self.close()
                    raise RuntimeError(f"reward worker for {self.user_specs} did not start ({status}); "
                                       f"import the specs in a fresh python to see why")
                (i, _), w.task = w.task, None
                if status == "ok":
                    scores[i] = value
                    continue
                (self.timeouts if status == "timeout" else self.errors)[spec] += 1
                self.last_error[spec] = value or status
                if status in ("timeout", "died"):
                    self._replace(w)
        return scores

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.user_specs)

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.process.join(1.0)
            if w.process.is_alive():
                w.kill()
        self._workers = []

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

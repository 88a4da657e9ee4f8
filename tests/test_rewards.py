"""Rule-based rewards against DESIGN.md's table of rules, fuzzing, and user rewards in workers."""

import os
import pathlib
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsjax.rl import rewards

CALL_BUDGET_S = 1.0  # every built-in reward call, on any input
USER_TIMEOUT_S = 1.0  # RewardRunner per-call timeout in these tests
TIMEOUT_SLACK_S = 2.0  # kill + bookkeeping beyond the timeout, on a loaded 2-core CI machine
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # spawned workers inherit sys.path
import reward_fixtures  # noqa: E402,F401  (fails here, not in a worker, if the path is wrong)

T, A = "<think>reasoning</think>", "<answer>{}</answer>"


def r1(answer):
    return T + A.format(answer)


ACCURACY_CASES = [
    # numbers in every notation
    (r1("42"), "42", 1.0),
    (r1("42.0"), "42", 1.0),
    (r1("4.2e1"), "42", 1.0),
    (r1("4.2E+1"), "42.000", 1.0),
    (r1("100."), "1e2", 1.0),
    (r1(".5"), "0.5", 1.0),
    (r1("-0.0"), "0", 1.0),
    (r1("-3"), "-3.0", 1.0),
    (r1("-3"), "3", 0.0),
    (r1("43"), "42", 0.0),
    (r1("0x2A"), "42", 0.0),
    (r1("٤٢"), "42", 0.0),  # non-ASCII digits are not numbers here
    # thousands separators and whitespace
    (r1("1,234,567"), "1234567", 1.0),
    (r1("1_000"), "1,000", 1.0),
    (r1("1,000.5"), "1000.5", 1.0),
    (r1("-1,234"), "-1234", 1.0),
    (r1("1,2"), "12", 0.0),  # a tuple, not a thousands separator
    (r1("1_0"), "10", 0.0),
    (r1(" 4 2\n"), "42", 1.0),
    (r1("x = 4"), "x=4", 1.0),
    # leading +
    (r1("+7"), "7", 1.0),
    (r1("7"), "+7", 1.0),
    (r1("+7"), "+7.0", 1.0),
    (r1("+1/2"), "1/2", 1.0),
    (r1("\\sqrt{2}"), "+\\sqrt{2}", 1.0),
    (r1("++7"), "7", 0.0),
    # nan / inf never match, in any spelling, even as identical strings
    (r1("nan"), "nan", 0.0),
    (r1("NaN"), "NaN", 0.0),
    (r1("inf"), "inf", 0.0),
    (r1("-inf"), "-inf", 0.0),
    (r1("Infinity"), "Infinity", 0.0),
    (r1("1e999"), "1e999", 0.0),
    (r1("\\infty"), "\\infty", 0.0),
    (r1("∞"), "∞", 0.0),
    # fractions are strings, not numbers
    (r1("1/2"), "0.5", 0.0),
    (r1("0.5"), "1/2", 0.0),
    (r1("1/2"), "1/2", 1.0),
    (r1("\\frac{1}{2}"), "\\frac{1}{2}", 1.0),
    # case-sensitive strings
    (r1("Paris"), "Paris", 1.0),
    (r1("paris"), "Paris", 0.0),
    (r1("x"), "X", 0.0),
    # exactly one <answer> block
    (r1("42") + A.format("42"), "42", 0.0),
    (T + "<answer>42</answer><answer>", "42", 0.0),
    (T + "<answer>42", "42", 0.0),
    (r1("42") + A.format("42") + "\\boxed{42}", "42", 0.0),  # no \boxed fallback either
    (T + "<answer>\\boxed{42}", "42", 0.0),
    (T + "<answer>42</answer></answer>", "42", 1.0),
    (r1("41") + " \\boxed{42}", "42", 0.0),  # <answer> wins over \boxed
    (r1("\\boxed{42}"), "42", 1.0),  # a block that is exactly one \boxed{X} reads as X
    (r1("\\boxed{4}2"), "42", 0.0),
    # boxed fallback: the last one, nested braces, escaped braces
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{41} no wait \\boxed{42}", "42", 1.0),
    ("\\boxed{42} no wait \\boxed{41}", "42", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", 1.0),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),  # unclosed
    ("\\boxed{42} \\boxed{", "42", 0.0),  # the last \boxed is unclosed
    ("\\boxed{\\boxed{42}}", "42", 1.0),  # the last one to open is the inner one
    ("\\boxed {42}", "42", 0.0),
    ("\\boxed{" * 10_000 + "7" + "}" * 10_000, "7", 1.0),
    ("\\boxed{" + "{" * 20_000 + "7", "7", 0.0),
    # empty or missing answers
    (r1(""), "", 0.0),
    (r1("   "), "", 0.0),
    (r1("42"), "", 0.0),
    (r1("42"), "  ", 0.0),
    (r1(""), "0", 0.0),
    ("\\boxed{}", "", 0.0),
    ("42", "42", 0.0),
    ("", "", 0.0),
    ("<think>x</think>", "x", 0.0),
    # hostile text is compared, never evaluated
    (r1("__import__('os').system('touch /tmp/pwned')"), "0", 0.0),
    (r1("6*7"), "42", 0.0),
    (r1("\ud800"), "\ud800", 1.0),
    (r1("\x00"), "0", 0.0),
    # over-long inputs and non-str inputs
    (r1("42") + " " * rewards.MAX_COMPLETION_CHARS, "42", 0.0),
    (r1("4" * (rewards.MAX_ANSWER_CHARS + 1)), "4" * (rewards.MAX_ANSWER_CHARS + 1), 0.0),
    (r1("4" * rewards.MAX_ANSWER_CHARS), "4" * rewards.MAX_ANSWER_CHARS, 1.0),
    (None, "42", 0.0),
    (42, "42", 0.0),
    (b"<answer>42</answer>", "42", 0.0),
    (r1("42"), 42, 0.0),
    (r1("42"), None, 0.0),
    ([r1("42")], "42", 0.0),
]

FORMAT_CASES = [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  <think>\na\n</think>\n\n<answer>\nb\n</answer>\n", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<think>x <b>y</b> \\boxed{1}</think>\t<answer>42</answer>", 1.0),
    ("x<think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think>x<answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer>x", 0.0),
    ("<think>a</think><answer>b</answer>.", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
    ("<think>a<think>b</think><answer>c</answer>", 0.0),
    ("<think>a</think></think><answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer></answer>", 0.0),
    ("<think>a</think><answer>b<think></answer>", 0.0),
    ("<think>a<answer>b</think></answer>", 0.0),
    ("<think>a</think>", 0.0),
    ("<answer>b</answer>", 0.0),
    ("<think>a</think><answer>b", 0.0),
    ("<think>a<answer>b</answer>", 0.0),
    ("<THINK>a</THINK><answer>b</answer>", 0.0),
    ("<think >a</think><answer>b</answer>", 0.0),
    ("", 0.0),
    ("   \n", 0.0),
    ("<think>a</think><answer>b</answer>" + " " * rewards.MAX_COMPLETION_CHARS, 0.0),
    (None, 0.0),
    (b"<think>a</think><answer>b</answer>", 0.0),
]


@pytest.mark.parametrize("completion,answer,expected", ACCURACY_CASES)
def test_accuracy_reward_table(completion, answer, expected):
    got = rewards.accuracy_reward(completion, answer)
    assert type(got) is float and got == expected, (str(completion)[:80], str(answer)[:80])


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_reward_table(completion, expected):
    got = rewards.format_reward(completion)
    assert type(got) is float and got == expected, str(completion)[:80]


def test_hostile_answer_is_never_executed(tmp_path):
    sentinel = tmp_path / "pwned"
    for payload in (f"__import__('os').system('touch {sentinel}')", f"open('{sentinel}','w')",
                    "().__class__.__bases__[0].__subclasses__()"):
        assert rewards.accuracy_reward(r1(payload), payload) == 1.0  # equal as strings only
        assert rewards.accuracy_reward(f"\\boxed{{{payload}}}", "0") == 0.0
    assert not sentinel.exists()


# ----------------------------------------------------------------------------------- fuzzing

PIECES = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "}", "\\", "\\{", "42",
          "4.2e1", "1,000", "1_000", "+", "-", ".", "nan", "inf", "1/2", " ", "\n", "\t", "<", ">",
          "\ud800", "\u202e", "\x00", "é", "∞"]
piece_soup = st.lists(st.sampled_from(PIECES) | st.text(max_size=8), max_size=40).map("".join)
megabyte = st.builds(lambda unit, n: unit * (n // max(1, len(unit))),
                     piece_soup.filter(bool), st.integers(100_000, 2_000_000))
completions = st.text() | piece_soup | megabyte | st.builds(
    lambda a, b: a + b, st.sampled_from(["\\boxed{", "{", "<answer>", "<think>"]).map(lambda s: s * 300_000),
    piece_soup)
answers = st.text(max_size=50) | piece_soup | st.sampled_from(["42", "1,000", "nan", "", " "])


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    elapsed = time.perf_counter() - start
    assert elapsed < CALL_BUDGET_S, f"{fn.__name__} took {elapsed:.2f}s on {len(args[0])} chars"
    assert type(value) is float and value in (0.0, 1.0)
    return value


@FUZZ
@given(completions, answers)
def test_fuzz_rewards_never_raise_and_return_promptly(completion, answer):
    timed(rewards.accuracy_reward, completion, answer)
    timed(rewards.format_reward, completion)


@FUZZ
@given(st.text().filter(lambda s: "<" not in s), st.text().filter(lambda s: "<" not in s),
       *[st.sampled_from(["", " ", "\n", " \n\t "])] * 3)
def test_fuzz_well_formed_completions_get_format_reward(think, answer, pad0, pad1, pad2):
    completion = f"{pad0}<think>{think}</think>{pad1}<answer>{answer}</answer>{pad2}"
    assert timed(rewards.format_reward, completion) == 1.0


@FUZZ
@given(st.integers(1 - 2**53, 2**53 - 2),  # n and n + 1 exact as floats
        st.sampled_from(["{}", "{:,}", "{:_}", "{}.0", "{}e0", " {} "]),
       st.booleans())
def test_fuzz_integer_notations(n, notation, boxed):
    text = notation.format(n)
    completion = f"\\boxed{{{text}}}" if boxed else r1(text)
    assert timed(rewards.accuracy_reward, completion, str(n)) == 1.0
    assert timed(rewards.accuracy_reward, completion, str(n + 1)) == 0.0
    if n >= 0:
        assert timed(rewards.accuracy_reward, r1("+" + text.strip()), f"{n:,}") == 1.0


# ------------------------------------------------------------------------------ user rewards

def test_load_reward_fn():
    assert rewards.load_reward_fn("reward_fixtures:exact_match")("a", "a") == 1.0
    assert rewards.load_reward_fn("os.path:join") is os.path.join
    for spec, message in [("reward_fixtures", "module:function"), (":f", "module:function"),
                          (None, "module:function"), ("no_such_module_dsjax:f", "cannot import"),
                          ("reward_fixtures:missing", "no attribute"),
                          ("reward_fixtures:NOT_CALLABLE", "not callable")]:
        with pytest.raises(ValueError, match=message) as info:
            rewards.load_reward_fn(spec)
        assert repr(spec) in str(info.value)
    with pytest.raises(ValueError, match="reward_fixtures:missing"):
        rewards.RewardRunner(["accuracy", "reward_fixtures:missing"])


def test_builtin_rewards_run_in_process():
    runner = rewards.RewardRunner(["accuracy", "format"])
    out = runner.score([r1("42"), "\\boxed{42}", r1("7")], ["42", "42", "42"])
    assert out == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert not runner._workers
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        runner.score(["a", "b"], ["a"])


@pytest.fixture(scope="module")
def runner():
    names = ["accuracy", "reward_fixtures:exact_match", "reward_fixtures:hang", "reward_fixtures:boom",
             "reward_fixtures:die", "reward_fixtures:not_a_number"]
    with rewards.RewardRunner(names, timeout_s=USER_TIMEOUT_S, num_workers=2) as r:
        yield r


def score_one(runner, spec, completions, answers=None):
    answers = answers or ["x"] * len(completions)
    timeouts, errors = runner.timeouts[spec], runner.errors[spec]
    start = time.perf_counter()
    scores = runner._score_user(spec, completions, answers)
    return scores, time.perf_counter() - start, runner.timeouts[spec] - timeouts, runner.errors[spec] - errors


def test_user_reward_scores_in_order(runner):
    errors, timeouts = dict(runner.errors), dict(runner.timeouts)
    out = runner.score(["a", r1("1,000"), "c", "d", "e"], ["a", "1000", "x", "d", "x"])
    assert out["reward_fixtures:exact_match"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert out["accuracy"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert out["reward_fixtures:hang"] == [1.0] * 5
    assert out["reward_fixtures:not_a_number"] == [0.0] * 5  # returns "one": not a float
    assert {n: runner.errors[n] - errors[n] for n in runner.names} == {
        n: 5 * (n == "reward_fixtures:not_a_number") for n in runner.names}
    assert runner.timeouts == timeouts


def test_hanging_user_reward_is_cut_off_and_counted(runner):
    score_one(runner, "reward_fixtures:hang", ["warm", "up"])  # workers started and ready
    pids = {w.process.pid for w in runner._workers}
    scores, elapsed, timeouts, errors = score_one(runner, "reward_fixtures:hang", ["ok", "hang", "ok"])
    assert scores == [1.0, 0.0, 1.0]
    assert (timeouts, errors) == (1, 0) and runner.last_error["reward_fixtures:hang"] == "timeout"
    assert USER_TIMEOUT_S <= elapsed < USER_TIMEOUT_S + TIMEOUT_SLACK_S
    new_pids = {w.process.pid for w in runner._workers}
    assert len(new_pids - pids) == 1 and len(runner._workers) == 2  # the hung worker was replaced
    (killed,) = pids - new_pids
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # terminated and reaped
    scores, _, timeouts, _ = score_one(runner, "reward_fixtures:hang", ["ok"] * 4)
    assert scores == [1.0] * 4 and timeouts == 0  # the replacement serves later calls


def test_raising_or_dying_user_reward_scores_zero_and_is_counted(runner):
    scores, _, timeouts, errors = score_one(runner, "reward_fixtures:boom", ["ok", "boom", "ok", "boom"])
    assert scores == [1.0, 0.0, 1.0, 0.0] and (timeouts, errors) == (0, 2)
    assert runner.last_error["reward_fixtures:boom"] == "RuntimeError: reward bug"
    scores, _, timeouts, errors = score_one(runner, "reward_fixtures:die", ["die", "ok", "ok"])
    assert scores == [0.0, 1.0, 1.0] and (timeouts, errors) == (0, 1)
    scores, _, timeouts, errors = score_one(runner, "reward_fixtures:not_a_number", ["nan", "x"])
    assert scores == [0.0, 0.0] and (timeouts, errors) == (0, 2)
    assert all(w.process.is_alive() for w in runner._workers)

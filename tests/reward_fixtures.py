"""User reward functions for tests/test_rewards.py, importable by spawned reward workers."""

import os
import time


def exact_match(completion, answer):
    return float(completion == answer)


def hang(completion, answer):
    if completion == "hang":
        time.sleep(600)
    return 1.0


def boom(completion, answer):
    if completion == "boom":
        raise RuntimeError("reward bug")
    return 1.0


def die(completion, answer):
    if completion == "die":
        os._exit(3)
    return 1.0


def not_a_number(completion, answer):
    return float("nan") if completion == "nan" else "one"


NOT_CALLABLE = 1.0

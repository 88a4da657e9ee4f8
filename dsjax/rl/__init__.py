"""GRPO (DeepSeekMath §4.1, DeepSeek-R1): `grpo` (advantages, loss) and `rewards` (R1 rewards).

Submodules load on first access so that spawned reward workers, which import `rewards`, do not
pay for importing jax through `grpo`.
"""

import importlib

__all__ = ["grpo", "rewards"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

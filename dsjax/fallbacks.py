"""Kernel fallbacks announce themselves once per cause.

A GPU kernel that cannot take some operands (a shape off its tiling, a dtype it lacks) hands them
to the XLA reference path instead of failing; the user hears about it once per distinct cause, in
the log of the module that fell back, not once per traced call.
"""

from __future__ import annotations

import logging
from typing import Hashable

_seen: set = set()


def warn_once(log: logging.Logger, key: Hashable, message: str) -> None:
    """`log.warning(message)` the first time `key` is seen in this process."""
    if key not in _seen:
        _seen.add(key)
        log.warning(message)


def forget() -> None:
    """Forgets every cause seen, so the next fallback warns again (tests)."""
    _seen.clear()

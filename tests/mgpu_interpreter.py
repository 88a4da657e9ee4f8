"""Pallas's Mosaic GPU interpreter (jax >= 0.11), for running the Mosaic GPU kernels on CPU in tests."""

from __future__ import annotations

import pytest


def interpreter_params():
    """The interpreter's params class (call it for the `interpret=` value), or None before jax 0.11."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return None
    return getattr(plgpu, "InterpretGPUParams", None)


needs_interpreter = pytest.mark.skipif(interpreter_params() is None,
                                       reason="needs Pallas's Mosaic GPU interpreter (jax >= 0.11)")

"""Loads configs/<name>.py presets by path (configs/ is not a package)."""

from __future__ import annotations

import importlib.util
import os

from dsjax.config import Config, from_config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_dict(name: str):
    spec = importlib.util.spec_from_file_location(f"dsjax_preset_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load(name: str, num_devices=None) -> Config:
    return from_config_dict(config_dict(name), num_devices)

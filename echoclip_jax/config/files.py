"""Experiment config files: Python files whose `get_config()` returns a ConfigDict (`configs/*.py`).

Commands read them through their `--config` flag (ml_collections' config_flags, which also takes
`--config.field=value` overrides). `load` is the same read for code (tests, benchmarks, a config file that
starts from another one): the file is loaded by its path, so config files need not be an installed package.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def refuse_url(path, flag: str | None = None) -> None:
    """Config files stay on local disk (they are Python code, imported): a URL is refused with the fix.
    `flag` names where the path came from (e.g. "--config")."""
    if "://" in str(path):
        where = f"{flag}={path}" if flag else str(path)
        raise ValueError(
            f"{where}: a config file is Python code, read from local disk: copy it here first "
            f"(`gcloud storage cp {path} .`) and pass the local copy"
        )


def load(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, then `overrides` ({"a.b": value}) applied."""
    refuse_url(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    name = "echoclip_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file defines get_config() returning a ConfigDict")
    config = module.get_config()
    for field, value in (overrides or {}).items():
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"{path}: no field {field!r} to override")
        node[leaf] = value
    return config


def sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
    """The config of the file `name` beside `config_file` (a preset that starts from another one)."""
    return load(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))

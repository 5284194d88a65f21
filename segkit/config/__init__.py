"""Hydra glue: compose configs from Python, find project config folders, wire builds.

The config tree lives in the top-level ``configs/`` folder and ships as the ``segkit.configs``
package; installed projects add their own config folders to the same groups through the
``segkit.plugins`` entry point (see :mod:`segkit.config.search_path`).
"""
from .compose import (compose, config_dir, is_config_group, list_experiments,
                      resolve_output_dir, to_plain)
from .app import hydra_app
from .search_path import project_config_sources, searchpath_overrides

__all__ = [
    "compose", "config_dir", "is_config_group", "hydra_app", "searchpath_overrides", "list_experiments", "project_config_sources", "resolve_output_dir",
    "to_plain",
]

"""Where Hydra finds configs: segkit's own tree plus every installed project's.

A project is a Python distribution with an entry point in the ``segkit.plugins`` group (its
value names the module to import, which registers the project's components). If the top-level
package of that module has a ``configs`` sub-package, that folder joins Hydra's search path, so
its files land in the core groups: ``projects/DeepMask`` shipping
``segkit_deepmask/configs/model/proposal_generator/sharpmask.yaml`` makes
``model/proposal_generator=sharpmask`` work once installed (DESIGN.md, "Config").

The folders are passed as a ``hydra.searchpath`` override (by :func:`segkit.config.compose` and
by :func:`segkit.config.hydra_app` for the command-line apps) rather than through a Hydra
search-path plugin, because Hydra cannot discover plugins of an editable install.
"""
from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points
from typing import List, Tuple

from segkit.registry import PLUGIN_GROUP


def project_config_sources() -> List[Tuple[str, str]]:
    """``(provider, "pkg://<package>.configs")`` for each installed project with configs."""
    sources = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        package = ep.value.split(":")[0].split(".")[0]
        try:
            spec = importlib.util.find_spec(f"{package}.configs")
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            sources.append((f"segkit-{ep.name}", f"pkg://{package}.configs"))
    return sources


def searchpath_overrides(overrides: List[str]) -> List[str]:
    """``overrides`` plus a ``hydra.searchpath`` override naming the projects' config folders
    (appended to any search path the user gave)."""
    paths = [path for _, path in project_config_sources()]
    if not paths:
        return list(overrides)
    user = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "hydra.searchpath"]
    rest = [o for o in overrides if o not in user]
    if user:
        given = user[-1].split("=", 1)[1].strip().strip("[]")
        paths = [p.strip().strip("'\"") for p in given.split(",") if p.strip()] + paths
    quoted = ",".join(f"'{p}'" for p in paths)
    return rest + [f"hydra.searchpath=[{quoted}]"]

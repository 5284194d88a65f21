"""``compose()``: the composed Hydra config from Python (notebooks, tests, tools).

The command-line apps use ``@hydra.main`` on the same tree; ``compose`` gives the same result
for the same overrides, with one difference: outside a Hydra run there is no
``hydra:runtime.output_dir``, so ``train.output_dir`` becomes ``output/<experiment>`` unless
an override sets it.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from .search_path import project_config_sources, searchpath_overrides

CONFIG_MODULE = "segkit.configs"


def config_dir() -> Path:
    """Folder of the installed config tree (``configs/`` of the source checkout)."""
    import segkit.configs

    return Path(segkit.configs.__file__).parent


def list_experiments() -> List[str]:
    """Names of the experiment configs of the core tree and of installed projects."""
    names = {p.stem for p in (config_dir() / "experiment").glob("*.yaml")}
    from importlib.resources import files

    from .search_path import project_config_sources

    for _, src in project_config_sources():
        folder = files(src[len("pkg://"):]).joinpath("experiment")
        if folder.is_dir():
            names |= {Path(p.name).stem for p in folder.iterdir() if p.name.endswith(".yaml")}
    return sorted(names)


def resolve_output_dir(cfg: DictConfig) -> str:
    """``train.output_dir`` resolved, falling back to ``output/<experiment>`` outside Hydra."""
    node = cfg.train
    if OmegaConf.is_interpolation(node, "output_dir"):
        raw = OmegaConf.to_container(node, resolve=False)["output_dir"]
        if "hydra:" in str(raw):
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                return HydraConfig.get().runtime.output_dir
            return os.path.join("output", str(cfg.get("experiment") or "default"))
    return str(node.output_dir)


def compose(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the segkit config with Hydra override strings.

    Args:
        overrides: Hydra overrides, e.g. ``["experiment=mask_rcnn_r50_fpn_1x_coco",
            "model/backbone=resnet101_fpn", "solver.base_lr=0.01", "+train.note=x"]``.
        config_name: primary config.

    Returns:
        The composed config (struct mode, interpolations unresolved; ``train.output_dir`` set).

    Raises:
        ValueError: an override names a key that does not exist, with close matches.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            cfg = hydra_compose(config_name, overrides=searchpath_overrides(overrides))
    except Exception as e:  # Hydra's messages are good; add a "did you mean" for key typos
        hint = _override_hint(overrides, config_name)
        if hint:
            raise ValueError(f"{e}\n{hint}") from e
        raise
    out = resolve_output_dir(cfg)
    with open_dict(cfg):
        cfg.train.output_dir = out
    return cfg


def _override_hint(overrides: List[str], config_name: str) -> Optional[str]:
    """For ``a.b.kye=v`` where ``kye`` does not exist, suggest the close existing keys."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    groups = [o for o in overrides if "=" in o and is_config_group(o.split("=", 1)[0].lstrip("+~"))]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            base = hydra_compose(config_name, overrides=searchpath_overrides(groups))
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or key.startswith(("+", "~", "hydra.")) or is_config_group(key):
            continue
        parts = key.split(".")
        node: Any = base
        for i, part in enumerate(parts):
            # keys(), not `in`: OmegaConf's `in` is False for a key whose value is ??? (missing)
            if not isinstance(node, DictConfig) or part not in node.keys():
                keys = list(node.keys()) if isinstance(node, DictConfig) else []
                close = difflib.get_close_matches(part, [str(k) for k in keys], n=3, cutoff=0.5)
                where = ".".join(parts[:i]) or "<root>"
                msg = f"unknown config key '{key}': '{where}' has no key '{part}'"
                if close:
                    names = " or ".join(repr(".".join(parts[:i] + [c])) for c in close)
                    msg += f"; did you mean {names}?"
                return msg + " (use '+key=value' to add a new key)"
            node = node._get_node(part)  # no value access: ??? values must not raise
    return None


def is_config_group(key: str) -> bool:
    """Whether ``key`` names a config group (``dataset``, ``model/backbone``), not a value, in
    the core tree or in an installed project's configs (``model/refinement`` of DeepMask)."""
    if (config_dir() / key).is_dir():
        return True
    for _, source in project_config_sources():
        package = source[len("pkg://"):]
        spec = importlib.util.find_spec(package)
        folders = list(spec.submodule_search_locations or []) if spec else []
        if any((Path(folder) / key).is_dir() for folder in folders):
            return True
    return False


def to_plain(cfg: Any) -> Any:
    """A composed config as plain, fully resolved containers (for checkpoints and JSON)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg

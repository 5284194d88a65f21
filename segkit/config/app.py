"""``hydra_app``: run a function as a Hydra command-line app on segkit's config tree.

Used by the console scripts (``segkit-train`` ...). It is ``@hydra.main`` on
``pkg://segkit.configs`` plus the installed projects' config folders (added to
``hydra.searchpath``, see :mod:`segkit.config.search_path`), so the command line accepts the
full Hydra grammar: ``model/backbone=resnet101_fpn``, ``solver.base_lr=0.01``, ``+key=value``,
``-m`` sweeps, ``--cfg job``.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

from omegaconf import DictConfig

from .search_path import searchpath_overrides


def hydra_app(task: Callable[[DictConfig], object], config_name: str = "config") -> Callable[[], object]:
    """Wrap ``task(cfg)`` into a zero-argument console-script entry point."""
    import hydra

    main = hydra.main(version_base=None, config_path="pkg://segkit.configs",
                      config_name=config_name)(task)

    @functools.wraps(task)
    def entry() -> object:
        args = sys.argv[1:]
        # only `key=value` words are overrides; flags and their values (`--cfg job`) stay put
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        merged = searchpath_overrides(overrides)
        if merged != overrides:
            kept = [a for a in args if a not in overrides or a in merged]
            added = [o for o in merged if o not in overrides]
            # next to the other overrides: argparse takes one run of positional words, so
            # `a=1 --cfg job hydra.searchpath=...` would be refused
            at = next((i for i, a in enumerate(kept) if a in overrides), 0)
            sys.argv = [sys.argv[0]] + kept[:at] + added + kept[at:]
        try:
            return main()
        except SystemExit as e:
            # Hydra has printed its error; add "did you mean" for a mistyped key
            if e.code not in (0, None):
                from .compose import _override_hint

                hint = _override_hint(overrides, config_name)
                if hint:
                    print(hint, file=sys.stderr)
            raise

    return entry

"""Console scripts ``segkit-train`` and ``segkit-eval``.

``segkit-train [overrides]`` is a Hydra app on segkit's config tree (full override grammar,
``-m`` sweeps, ``--cfg job``); it trains, evaluates, and prints the final AP table.

``segkit-eval checkpoint=PATH [overrides]`` (or ``--checkpoint PATH``) evaluates a checkpoint.
The config comes from the checkpoint's ``meta.config`` when it has one (a segkit training run),
with the overrides applied on top; otherwise (converted checkpoints) it is composed from the
config tree for the experiment the checkpoint names, and an ``experiment=...`` override always
recomposes from the tree (:func:`checkpoint_config`, shared with ``segkit-demo``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["checkpoint_config", "eval_config", "eval_main", "requeued", "run_eval", "run_train",
           "train_main", "train_worker"]

logger = logging.getLogger(__name__)


def run_train(cfg: DictConfig) -> Dict[str, Any]:
    """Train from a composed config and return the final results, through
    :func:`segkit.engine.launch`: in this process, in ``train.num_processes_per_machine``
    local processes, or as one rank of a torchrun / SLURM job.

    Honours ``train.resume``; a SLURM job that was requeued (preempted or timed out) resumes
    from its last checkpoint on its own.
    """
    from segkit.config import resolve_output_dir

    from .launch import launch

    with open_dict(cfg):
        # Hydra's runtime is known only in this process: spawned ones get the plain path
        cfg.train.output_dir = resolve_output_dir(cfg)
    t = cfg.train
    return launch(train_worker, (cfg,),
                  num_processes_per_machine=int(t.get("num_processes_per_machine", 1)),
                  num_machines=int(t.get("num_machines", 1)),
                  machine_rank=int(t.get("machine_rank", 0)),
                  dist_url=str(t.get("dist_url", "auto")), device=str(t.device))


def requeued() -> bool:
    """True in a SLURM job that the scheduler restarted (``SLURM_RESTART_COUNT`` > 0: after a
    preemption, or a timeout that submitit turned into a requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def train_worker(cfg: DictConfig) -> Dict[str, Any]:
    """One process's training run (every rank runs it; rank 0 writes the results)."""
    from segkit.utils.comm import is_main_process

    from .defaults import Trainer, default_setup, format_results_table, save_results_json

    output_dir = default_setup(cfg)
    resume = bool(cfg.train.resume)
    if not resume and requeued():
        logger.info("SLURM requeued this job (restart %s): resuming from its last checkpoint",
                    os.environ["SLURM_RESTART_COUNT"])
        resume = True
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    results = trainer.train()
    if is_main_process():
        logger.info("Final evaluation (%s):\n%s", cfg.get("experiment"),
                    format_results_table(results))
        save_results_json(results, os.path.join(output_dir, "final_results.json"),
                          experiment=cfg.get("experiment"))
    return results


def train_main() -> Any:
    """Entry point of ``segkit-train``."""
    from segkit.config.app import hydra_app

    return hydra_app(run_train)()


def eval_config(meta_config: Optional[dict], overrides: Sequence[str]) -> DictConfig:
    """The evaluation config: the checkpoint's own config plus ``overrides``.

    Value overrides (``train.device=cuda``, ``+x=1``, ``~x``) are applied to the stored config.
    A group override (``dataset/val=...``, ``dataset=coco_2017``) replaces that subtree with the
    group's composed content. Without a stored config, or when ``experiment=...`` is given, the
    config is composed from the tree with all overrides.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from segkit.config import compose, is_config_group

    overrides = list(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    if meta_config is None or any(o.key_or_group == "experiment" and not o.is_delete()
                                  for o in parsed):
        return compose(overrides)
    cfg = OmegaConf.create(meta_config)
    for text, o in zip(overrides, parsed):
        key = o.key_or_group
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                raise ValueError(f"cannot delete '{key}': not in the checkpoint's config")
            with open_dict(node):
                del node[leaf]
        elif is_config_group(key):
            # '~experiment': the stored config already is the experiment's result
            sub = OmegaConf.select(compose([text, "~experiment"]), key.replace("/", "."))
            OmegaConf.update(cfg, key.replace("/", "."), sub, merge=False, force_add=True)
        else:
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" \
                    and not o.is_add():
                raise ValueError(f"unknown config key '{key}' in override '{text}' (not in "
                                 "the checkpoint's config; use '+key=value' to add one)")
            OmegaConf.update(cfg, key, o.value(), merge=False, force_add=True)
    return cfg


def checkpoint_config(meta: Mapping[str, Any], overrides: Sequence[str],
                      checkpoint: str = "checkpoint") -> DictConfig:
    """The config that rebuilds a checkpoint's model: :func:`eval_config` of its stored config,
    or, for a checkpoint without one (converted weights), of the experiment it names.

    Args:
        meta: the checkpoint's ``meta`` (``config``, ``experiment``).
        overrides: Hydra overrides; an ``experiment=...`` one recomposes from the tree.
        checkpoint: the file, named in error messages.

    Raises:
        ValueError: neither a stored config, an experiment name nor an ``experiment=``
            override; or a bad override (the message names it).
    """
    overrides = list(overrides)
    names_experiment = any(o.lstrip("+").split("=", 1)[0] == "experiment" for o in overrides)
    if meta.get("config") is None and not names_experiment:
        if not meta.get("experiment"):
            raise ValueError(f"checkpoint '{checkpoint}' stores neither a config nor an "
                             "experiment name; name one with experiment=<name>")
        overrides.insert(0, f"experiment={meta['experiment']}")
    return eval_config(meta.get("config"), overrides)


def _parse_eval_args(argv: Optional[Sequence[str]]) -> Tuple[str, List[str]]:
    parser = argparse.ArgumentParser(
        prog="segkit-eval", description="COCO evaluation of a segkit checkpoint. Usage: "
        "segkit-eval checkpoint=PATH [hydra overrides] (or --checkpoint PATH).")
    parser.add_argument("--checkpoint", help="checkpoint file (.pth)")
    parser.add_argument("overrides", nargs="*", help="checkpoint=PATH and config overrides")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    checkpoint, overrides = args.checkpoint, []
    for o in args.overrides:
        if o.startswith("checkpoint="):
            checkpoint = o.split("=", 1)[1]
        else:
            overrides.append(o)
    if not checkpoint:
        parser.error("no checkpoint given: pass checkpoint=PATH or --checkpoint PATH")
    return checkpoint, overrides


def run_eval(checkpoint: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Evaluate ``checkpoint`` on the validation split; write ``eval_results.json``.

    Results go to ``train.output_dir`` when an override sets it, else to
    ``<checkpoint folder>/eval_<checkpoint name>``.
    """
    from segkit.checkpoint import load_checkpoint, load_state_dict_report

    from .defaults import (build_datasets, build_model, default_setup, evaluate,
                           format_results_table, save_results_json)

    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.get("meta") or {}
    cfg = checkpoint_config(meta, overrides, checkpoint)
    if not any(o.lstrip("+").startswith("train.output_dir=") for o in overrides):
        stem = os.path.splitext(os.path.basename(checkpoint))[0]
        with open_dict(cfg):
            cfg.train.output_dir = os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                                f"eval_{stem}")
    output_dir = default_setup(cfg)
    records, metadata = build_datasets(cfg, splits=("val",))["val"]
    classes, saved = list(metadata["thing_classes"]), list(meta.get("classes") or [])
    if saved and len(saved) != len(classes):
        raise ValueError(f"checkpoint '{checkpoint}' was trained on {len(saved)} classes "
                         f"{saved[:5]}... but dataset.val has {len(classes)}; pick the matching "
                         "dataset (e.g. dataset=...)")
    if saved and saved != classes:
        logger.warning("class names differ between checkpoint %s and the dataset: %s vs %s",
                       checkpoint, saved, classes)
    model = build_model(cfg)
    load_state_dict_report(model, ckpt["model"], source=checkpoint)
    results = evaluate(cfg, model, records, metadata, output_dir=output_dir)
    logger.info("Evaluation of %s on %s:\n%s", checkpoint, metadata.get("name"),
                format_results_table(results))
    path = save_results_json(results, os.path.join(output_dir, "eval_results.json"),
                             checkpoint=os.path.abspath(checkpoint), dataset=metadata.get("name"))
    logger.info("Results written to %s", path)
    return results


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``segkit-eval``; returns the exit code (0 done, 2 unusable checkpoint,
    config or dataset, reported in one line on stderr). :func:`run_eval` returns the results.
    """
    from hydra.errors import HydraException

    from segkit.checkpoint import CheckpointError

    checkpoint, overrides = _parse_eval_args(argv)
    try:
        run_eval(checkpoint, overrides)
    except (CheckpointError, HydraException, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # no repr quotes
        print(f"segkit-eval: error: {message}", file=sys.stderr)
        return 2
    return 0

"""``segkit-zoo`` (also ``python -m segkit.model_zoo``): list, download and verify zoo files.

::

    segkit-zoo list [--task backbone]        # table: name, task, metrics, size, checks, cached
    segkit-zoo download NAME [NAME ...]      # prints the local path of each publisher's file
    segkit-zoo download --converted NAME     # prints the converted segkit checkpoint's path
    segkit-zoo verify [NAME ...]             # re-hash cached files: ok / missing / corrupt

``--catalog FILE`` (before the command) reads another catalog (as ``$SEGKIT_ZOO_CATALOG``).
Exit codes: 0 done; 1 ``verify`` found a corrupt file; 2 an error (unknown name, bad
catalog, download failure, offline without a cached file), reported in one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence

from .catalog import ZooEntry, ZooError, load_catalog

__all__ = ["main"]

PROG = "segkit-zoo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="segkit model zoo: published "
                                     "checkpoints, downloaded, checked and converted.")
    parser.add_argument("--catalog", action="append", metavar="FILE",
                        help="catalog YAML to read instead of $SEGKIT_ZOO_CATALOG / the shipped "
                             "one (repeat to merge; 'shipped' names the shipped catalog)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="table of the catalog's models")
    p.add_argument("--task", choices=["instance_segmentation", "detection", "backbone"])
    p = sub.add_parser("download", help="download (and check) models; print local paths")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--converted", action="store_true",
                   help="print the converted segkit checkpoint (converting once) instead")
    p = sub.add_parser("verify", help="re-hash cached downloads (all models by default)")
    p.add_argument("names", nargs="*", metavar="NAME")
    return parser


def _metrics(entry: ZooEntry) -> str:
    labels = (("box_ap", "box AP"), ("mask_ap", "mask AP"), ("top1", "top-1"))
    return ", ".join(f"{label} {entry.metrics[key]}" for key, label in labels
                     if key in entry.metrics)


def _size(entry: ZooEntry) -> str:
    if entry.size_bytes is not None:
        return f"{entry.size_bytes / 2 ** 20:.1f} MiB"
    return f"~{entry.approx_size_mib:.0f} MiB" if entry.approx_size_mib else "?"


def _list(entries: List[ZooEntry]) -> int:
    from tabulate import tabulate

    from .store import cached_state

    rows = [[e.name, e.task, e.source, _metrics(e), _size(e), e.hash_check(), cached_state(e)]
            for e in entries]
    print(tabulate(rows, headers=["name", "task", "source", "published metrics", "size",
                                  "checked by", "cached"], tablefmt="github"))
    return 0


def _download(entries: List[ZooEntry], converted: bool) -> int:
    from . import store

    for e in entries:
        path = store.checkpoint_path(e) if converted else store.fetch(e)
        print(path, flush=True)
    return 0


def _verify(entries: List[ZooEntry]) -> int:
    from tabulate import tabulate

    from .store import verify

    results = [verify(e) for e in entries]
    print(tabulate([[r.name, r.status, r.checks, str(r.path), r.detail] for r in results],
                   headers=["name", "status", "checked by", "file", "detail"], tablefmt="github"))
    corrupt = [r.name for r in results if r.status == "corrupt"]
    if corrupt:
        print(f"{PROG}: corrupt: {', '.join(corrupt)} (delete the file, or run `{PROG} "
              "download NAME`, which replaces a file that fails the publisher's hash)",
              file=sys.stderr)
    return 1 if corrupt else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``segkit-zoo``; returns the exit code (see the module docstring)."""
    from segkit.checkpoint import CheckpointError

    from .download import DownloadError

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s", stream=sys.stderr)
    try:
        catalog = load_catalog(args.catalog)
        if args.command == "list":
            return _list([e for e in (catalog.entries[n] for n in catalog.names())
                          if args.task is None or e.task == args.task])
        names = args.names or (catalog.names() if args.command == "verify" else [])
        entries = [catalog.get(n) for n in names]  # every name checked before any download
        if args.command == "download":
            return _download(entries, args.converted)
        return _verify(entries)
    except (ZooError, DownloadError, CheckpointError) as e:
        message = " ".join(str(e).split())  # one line, however long
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

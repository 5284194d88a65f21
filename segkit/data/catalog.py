"""Dataset and metadata catalogs, and ``get_dataset()`` from a config node.

``DatasetCatalog`` maps a dataset name to a loader function that returns the list of records
(see the record format in ``segkit.data.coco``). The loader runs on the first ``get`` and its
result is cached, so parsing a large annotation file happens once per process.
``MetadataCatalog`` maps the same names to the metadata dict (class names, category-id map,
annotation file, image folder) that the evaluator and the visualiser need.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable, Dict, List, Mapping, Tuple

from segkit.registry import DATASETS, build

__all__ = ["DatasetCatalog", "MetadataCatalog", "get_dataset"]

logger = logging.getLogger(__name__)


class _DatasetCatalog:
    """Name -> loader function returning ``list[dict]`` records, called lazily and cached."""

    def __init__(self):
        self._loaders: Dict[str, Callable[[], List[dict]]] = {}
        self._cache: Dict[str, List[dict]] = {}
        self._lock = threading.Lock()

    def register(self, name: str, loader: Callable[[], List[dict]], overwrite: bool = False):
        """Register ``loader`` (no arguments -> records) under ``name``.

        Raises:
            KeyError: ``name`` is taken by another loader and ``overwrite`` is False.
        """
        if not callable(loader):
            raise TypeError(f"dataset loader for '{name}' must be callable, got {loader!r}")
        with self._lock:
            if name in self._loaders and self._loaders[name] is not loader and not overwrite:
                raise KeyError(f"dataset '{name}' is already registered")
            self._loaders[name] = loader
            self._cache.pop(name, None)

    def get(self, name: str) -> List[dict]:
        """The records of ``name``; the loader runs on the first call only."""
        with self._lock:
            if name in self._cache:
                return self._cache[name]
            if name not in self._loaders:
                raise KeyError(f"dataset '{name}' is not registered; registered: "
                               f"{', '.join(sorted(self._loaders)) or '(none)'}")
            loader = self._loaders[name]
        records = loader()  # outside the lock: loaders may be slow or use the catalog
        if not isinstance(records, list):
            raise TypeError(f"loader of dataset '{name}' must return a list of dicts, "
                            f"got {type(records).__name__}")
        with self._lock:
            self._cache[name] = records
        return records

    def remove(self, name: str) -> None:
        with self._lock:
            self._loaders.pop(name, None)
            self._cache.pop(name, None)

    def list(self) -> List[str]:
        return sorted(self._loaders)

    def __contains__(self, name: str) -> bool:
        return name in self._loaders


class _MetadataCatalog:
    """Name -> metadata dict (``thing_classes``, ``contiguous_to_category_id``, ...)."""

    def __init__(self):
        self._meta: Dict[str, Dict[str, Any]] = {}

    def set(self, name: str, metadata: Mapping[str, Any]) -> None:
        """Store ``metadata`` (copied) for ``name``, replacing any previous entry."""
        meta = dict(metadata)
        meta.setdefault("name", name)
        self._meta[name] = meta

    def get(self, name: str) -> Dict[str, Any]:
        if name not in self._meta:
            raise KeyError(f"no metadata for dataset '{name}'; known: "
                           f"{', '.join(sorted(self._meta)) or '(none)'}")
        return self._meta[name]

    def remove(self, name: str) -> None:
        self._meta.pop(name, None)

    def list(self) -> List[str]:
        return sorted(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()

# config node (canonical JSON) -> dataset name, so one node is parsed once per process
_built_nodes: Dict[str, str] = {}


def _plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return node


def get_dataset(node: Mapping[str, Any], path: str = "") -> Tuple[List[dict], Dict[str, Any]]:
    """Build the DATASETS entry described by ``node`` and register it under its name.

    Args:
        node: config node such as ``{"name": "embedded", "split": "train"}`` or
            ``{"name": "coco_json", "json": ..., "images": ...}`` (dict or OmegaConf).
        path: dotted config path of ``node`` (e.g. ``"dataset.train"``); error messages name
            the offending key with it (``"dataset.train.json"``).

    Returns:
        ``(records, metadata)``. The records are also in ``DatasetCatalog`` and the metadata in
        ``MetadataCatalog`` under ``metadata["name"]``. The same node returns the cached
        result on later calls.
    """
    node = _plain(node)
    if not isinstance(node, Mapping):
        raise TypeError(f"dataset config{f' at {path!r}' if path else ''} must be a mapping "
                        f"with 'name', got {node!r}")
    key = json.dumps(node, sort_keys=True, default=str)
    name = _built_nodes.get(key)
    if name is not None and name in DatasetCatalog and name in MetadataCatalog:
        return DatasetCatalog.get(name), MetadataCatalog.get(name)

    records, metadata = build(node, DATASETS, path=path, config_path=path)
    name = metadata.get("name") or str(node["name"])
    if name in DatasetCatalog and name not in _built_nodes.values():
        logger.warning("dataset '%s' was registered by other code; replacing it", name)
    elif name in DatasetCatalog:
        old = next(k for k, v in _built_nodes.items() if v == name)
        if old != key:
            logger.warning("dataset '%s' now comes from %s (was %s)", name, key, old)
            del _built_nodes[old]
    DatasetCatalog.register(name, lambda: records, overwrite=True)
    DatasetCatalog.get(name)  # fill the cache with the already-loaded records
    MetadataCatalog.set(name, metadata)
    _built_nodes[key] = name
    return records, MetadataCatalog.get(name)

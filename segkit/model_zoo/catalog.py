"""The model-zoo catalog: which published checkpoints exist and how to use them.

The catalog is a YAML file (format in ``model_zoo/README.md``). The shipped one is
``model_zoo/catalog.yaml`` at the top of the source tree, installed as the package data
``segkit.model_zoo_catalog/catalog.yaml``; :func:`catalog_paths` finds it in both layouts.
``SEGKIT_ZOO_CATALOG=a.yaml[:b.yaml...]`` (``os.pathsep``-separated) replaces it, for tests and
private zoos; the word ``shipped`` in that list stands for the shipped catalog, so
``SEGKIT_ZOO_CATALOG=shipped:mine.yaml`` extends it. A later file's entry replaces an
earlier entry of the same name.

Every value is validated when the file is read (:mod:`.schema`); an error names the file, the
key path and the value (``catalog.yaml: models.foo.sha256: expected 8 to 64 hex characters
..., got 'xyz'``).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["CATALOG_ENV", "Catalog", "CatalogError", "UnknownModelError", "ZooEntry", "ZooError",
           "catalog_paths", "load_catalog", "shipped_catalog_path"]

CATALOG_ENV = "SEGKIT_ZOO_CATALOG"
CATALOG_PACKAGE = "segkit.model_zoo_catalog"
CATALOG_FILE = "catalog.yaml"


class ZooError(RuntimeError):
    """A model-zoo request cannot be served (bad catalog, unknown name, conversion problem)."""


class CatalogError(ZooError, ValueError):
    """A catalog file is missing or malformed; the message names the file and the key."""


class UnknownModelError(ZooError, LookupError):
    """No catalog entry has the requested name; the message lists the close names."""


def _coco80() -> List[str]:
    from segkit.checkpoint.detectron2 import COCO_CLASSES

    return list(COCO_CLASSES)


def _coco90_torchvision() -> List[str]:
    from segkit.checkpoint.convert import torchvision_coco_classes

    return torchvision_coco_classes()


# Class lists an entry may name instead of listing its classes (one source of truth each):
# coco80 = detectron2's contiguous COCO classes (category-id order, as the COCO json's sorted
# ids give them); coco90_torchvision = torchvision's 91 labels minus background, "N/A" gaps
# kept, i.e. the classes of the *_torchvision experiments (label_map category_id).
BUILTIN_CLASS_LISTS: Dict[str, Callable[[], List[str]]] = {
    "coco80": _coco80, "coco90_torchvision": _coco90_torchvision,
}


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint (fields as in ``model_zoo/README.md``).

    ``sha256`` / ``md5`` are what the publisher gives (full digest or prefix, lower-case hex),
    ``None`` when it gives none; ``size_bytes`` is exact (checked) and ``approx_size_mib`` only
    informative. ``classes`` is resolved to names; ``class_list`` keeps the name it was given by
    (``coco80``) or ``None`` for an inline list.
    """

    name: str
    task: str
    experiment: str
    source: str
    urls: Tuple[str, ...]
    filename: str
    sha256: Optional[str]
    md5: Optional[str]
    size_bytes: Optional[int]
    approx_size_mib: Optional[float]
    metrics: Mapping[str, Any]
    classes: Tuple[str, ...]
    class_list: Optional[str]
    license: str
    page: str
    overrides: Tuple[str, ...] = ()
    notes: str = ""
    catalog_file: str = ""

    def hash_check(self) -> str:
        """How a downloaded file is checked, in words (shown by ``segkit-zoo list/verify``)."""
        parts = []
        if self.sha256:
            parts.append("sha256" if len(self.sha256) == 64 else "sha256 prefix")
        if self.md5:
            parts.append("md5" if len(self.md5) == 32 else "md5 prefix")
        if self.size_bytes is not None:
            parts.append("size")
        if not self.sha256 or len(self.sha256) < 64:
            parts.append("sha256 pin")  # trust on first use: see segkit.model_zoo.store
        return " + ".join(parts)


@dataclass
class Catalog:
    """Entries by name, plus the files they came from (named in errors)."""

    entries: Dict[str, ZooEntry] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)

    def names(self) -> List[str]:
        return sorted(self.entries)

    def get(self, name: str) -> ZooEntry:
        """The entry called ``name``; :class:`UnknownModelError` lists close names otherwise."""
        if name in self.entries:
            return self.entries[name]
        names = self.names()
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        close += [n for n in names if name.lower() in n.lower() and n not in close][: 5 - len(close)]
        where = ", ".join(self.files) or "<empty catalog>"
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r} in the model zoo catalog ({where}){hint} "
                                f"(`segkit-zoo list` shows all {len(names)})")


def shipped_catalog_path() -> Path:
    """``catalog.yaml`` of the installed package data, or of the source checkout's
    ``model_zoo/`` (editable installs made before the package data existed, plain checkouts)."""
    try:
        from importlib.resources import files

        candidate = Path(str(files(CATALOG_PACKAGE).joinpath(CATALOG_FILE)))
        if candidate.is_file():
            return candidate
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "model_zoo" / CATALOG_FILE


def catalog_paths(catalog: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]] = None
                  ) -> List[Path]:
    """The catalog files to read: ``catalog`` (a path or a list), else ``$SEGKIT_ZOO_CATALOG``,
    else the shipped catalog. The word ``shipped`` stands for the shipped catalog."""
    if catalog is None:
        env = os.environ.get(CATALOG_ENV, "").strip()
        items: List[Any] = [p for p in env.split(os.pathsep) if p.strip()] if env else ["shipped"]
    elif isinstance(catalog, (str, os.PathLike)):
        items = [catalog]
    else:
        items = list(catalog)
    return [shipped_catalog_path() if str(p).strip() == "shipped" else Path(p).expanduser()
            for p in items]


def load_catalog(catalog: Union[None, str, os.PathLike, Sequence[Any], Catalog] = None) -> Catalog:
    """Read and validate the catalog file(s) (see :func:`catalog_paths`); a :class:`Catalog`
    passes through unchanged.

    Raises:
        CatalogError: a missing/unreadable file or a bad value, naming the file and key.
    """
    if isinstance(catalog, Catalog):
        return catalog
    from .schema import read_catalog_file

    result = Catalog()
    for path in catalog_paths(catalog):
        result.entries.update(read_catalog_file(path))
        result.files.append(str(path))
    return result

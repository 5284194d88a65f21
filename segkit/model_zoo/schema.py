"""Validation of model-zoo catalog files (format in ``model_zoo/README.md``).

Each value is checked as it is read, and the first bad one stops with a :class:`CatalogError`
of the form ``model zoo catalog <file>: <key path>: expected <what>, got <value>``, so a typo in
a private catalog is found at once, not when a download or a build fails later.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .catalog import BUILTIN_CLASS_LISTS, CATALOG_ENV, CatalogError, ZooEntry

__all__ = ["FORMAT", "REQUIRED_METRICS", "SOURCES", "TASKS", "VERSION", "read_catalog_file"]

FORMAT = "segkit-model-zoo"
VERSION = 1
SOURCES = ("torchvision", "detectron2", "segkit")
TASKS = ("instance_segmentation", "detection", "backbone")
# the metrics each task must publish (the numbers users compare against)
REQUIRED_METRICS = {"instance_segmentation": ("box_ap", "mask_ap"), "detection": ("box_ap",),
                    "backbone": ("top1",)}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEX = re.compile(r"^[0-9a-f]+$")


def read_catalog_file(path: Path) -> Dict[str, ZooEntry]:
    """Entries of one catalog file, validated (:class:`CatalogError` names file and key)."""
    import yaml

    if not path.is_file():
        raise CatalogError(f"model zoo catalog {path} does not exist (set by the catalog "
                           f"argument or ${CATALOG_ENV})")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CatalogError(f"cannot read model zoo catalog {path}: {e}") from e
    check = _Checker(str(path))
    if not isinstance(data, dict):
        check.fail("<root>", "a mapping with 'format', 'version' and 'models'", data)
    if data.get("format") != FORMAT:
        check.fail("format", repr(FORMAT), data.get("format"))
    if data.get("version") != VERSION:
        check.fail("version", str(VERSION), data.get("version"))
    unknown = sorted(set(data) - {"format", "version", "class_lists", "models"})
    if unknown:
        check.fail(unknown[0], "one of format, version, class_lists, models", "(unknown key)")
    lists = data.get("class_lists") or {}
    if not isinstance(lists, dict):
        check.fail("class_lists", "a mapping name -> list of class names", lists)
    for name, names in lists.items():
        check.names(f"class_lists.{name}", names)
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        check.fail("models", "a non-empty mapping name -> entry", models)
    return {str(name): _entry(check, str(name), node, lists) for name, node in models.items()}


class _Checker:
    """Builds the ``<file>: <key>: expected ..., got ...`` errors of one catalog file."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, key: str, expected: str, got: Any) -> None:
        raise CatalogError(f"model zoo catalog {self.file}: {key}: expected {expected}, "
                           f"got {got!r}")

    def string(self, key: str, value: Any, optional: bool = False) -> Optional[str]:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "a non-empty string", value)
        return value.strip()

    def names(self, key: str, value: Any) -> List[str]:
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v for v in value):
            self.fail(key, "a non-empty list of class names", value)
        return list(value)

    def digest(self, key: str, value: Any, shortest: int, full: int) -> Optional[str]:
        if value is None:
            return None
        if not isinstance(value, str):  # YAML reads 280758 as a number: quote hex digests
            self.fail(key, f"a quoted string of {shortest} to {full} hex characters", value)
        h = value.strip().lower()
        if not (shortest <= len(h) <= full and _HEX.match(h)):
            self.fail(key, f"{shortest} to {full} hex characters (a digest or the prefix the "
                           "publisher gives) or null", value)
        return h

    def url(self, key: str, value: Any) -> str:
        parts = urllib.parse.urlsplit(self.string(key, value) or "")
        if parts.scheme not in ("https", "http") or not parts.netloc or not parts.path.strip("/"):
            self.fail(key, "an http(s) URL of a file", value)
        return value.strip()


def _entry(check: _Checker, name: str, node: Any, lists: Mapping[str, List[str]]) -> ZooEntry:
    at = f"models.{name}"
    if not _NAME.match(name):
        check.fail(at, "a name of letters, digits, '_', '.', '-'", name)
    if not isinstance(node, dict):
        check.fail(at, "a mapping", node)
    allowed = {"task", "experiment", "overrides", "source", "urls", "filename", "sha256", "md5",
               "size_bytes", "approx_size_mib", "metrics", "classes", "license", "page", "notes"}
    unknown = sorted(set(node) - allowed)
    if unknown:
        check.fail(f"{at}.{unknown[0]}", f"one of {', '.join(sorted(allowed))}", "(unknown key)")
    task = node.get("task")
    if task not in TASKS:
        check.fail(f"{at}.task", f"one of {', '.join(TASKS)}", task)
    source = node.get("source")
    if source not in SOURCES:
        check.fail(f"{at}.source", f"one of {', '.join(SOURCES)}", source)
    urls = node.get("urls")
    if not isinstance(urls, list) or not urls:
        check.fail(f"{at}.urls", "a non-empty list of URLs (primary first, then mirrors)", urls)
    urls = tuple(check.url(f"{at}.urls[{i}]", u) for i, u in enumerate(urls))
    filename = node.get("filename") or os.path.basename(urllib.parse.urlsplit(urls[0]).path)
    if not _NAME.match(str(filename)):
        check.fail(f"{at}.filename", "a plain file name", filename)
    overrides = node.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        check.fail(f"{at}.overrides", "a list of Hydra override strings", overrides)
    size = node.get("size_bytes")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        check.fail(f"{at}.size_bytes", "a positive byte count or null", size)
    approx = node.get("approx_size_mib")
    if approx is not None and (isinstance(approx, bool) or not isinstance(approx, (int, float))
                               or approx <= 0):
        check.fail(f"{at}.approx_size_mib", "a positive number (MiB) or null", approx)
    classes, class_list = _classes(check, f"{at}.classes", node.get("classes"), task, lists)
    return ZooEntry(
        name=name, task=task, experiment=check.string(f"{at}.experiment", node.get("experiment")),
        source=source, urls=urls, filename=str(filename),
        sha256=check.digest(f"{at}.sha256", node.get("sha256"), 8, 64),
        md5=check.digest(f"{at}.md5", node.get("md5"), 6, 32),
        size_bytes=size, approx_size_mib=None if approx is None else float(approx),
        metrics=_metrics(check, f"{at}.metrics", node.get("metrics"), task),
        classes=tuple(classes), class_list=class_list,
        license=check.string(f"{at}.license", node.get("license")),
        page=check.url(f"{at}.page", node.get("page")), overrides=tuple(overrides),
        notes=str(node.get("notes") or "").strip(), catalog_file=check.file)


def _classes(check: _Checker, key: str, value: Any, task: str,
             lists: Mapping[str, List[str]]) -> Tuple[List[str], Optional[str]]:
    if value is None:
        if task != "backbone":
            check.fail(key, "class names (a list, a class_lists name or one of "
                            f"{', '.join(BUILTIN_CLASS_LISTS)})", value)
        return [], None
    if isinstance(value, list):
        return check.names(key, value), None
    if isinstance(value, str) and value in lists:
        return list(lists[value]), value
    if isinstance(value, str) and value in BUILTIN_CLASS_LISTS:
        return BUILTIN_CLASS_LISTS[value](), value
    check.fail(key, f"a list of names or one of {', '.join([*lists, *BUILTIN_CLASS_LISTS])}",
               value)
    return [], None  # unreachable


def _metrics(check: _Checker, key: str, value: Any, task: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        check.fail(key, "a mapping of published metrics with 'dataset' and 'source'", value)
    for required in ("dataset", "source"):
        check.string(f"{key}.{required}", value.get(required))
    for metric in REQUIRED_METRICS[task]:
        number = value.get(metric)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            check.fail(f"{key}.{metric}", f"the published {metric} of a {task} model (a number)",
                       number)
    return dict(value)

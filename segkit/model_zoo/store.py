"""Files of the model zoo in the cache: downloads, sha256 pins and converted checkpoints.

Layout, all in :func:`~segkit.model_zoo.download.cache_dir` (``$SEGKIT_CACHE/model_zoo``)::

    <filename>                                  the publisher's file, as downloaded
    <filename>.sha256                           its sha256 pin (see below)
    <entry>.segkit-v<N>-<sha256[:12]>.pth       converted segkit checkpoint (not for "segkit")

How a download is checked. Whatever the publisher gives is checked by
:func:`~segkit.model_zoo.download.download`: torchvision names its files with a sha256 prefix
(8 hex, torch.hub's convention), detectron2 with an md5 prefix (6 hex, its MODEL_ZOO.md says
so); an exact ``size_bytes`` is checked when the catalog has one. A short prefix catches a
truncated or damaged file but is weak against a deliberate substitution, so unless the catalog
has a full sha256, the sha256 of the first download that passed those checks is written to
``<filename>.sha256`` (trust on first use) and every later fetch or ``segkit-zoo verify``
compares against it. Deleting the pin trusts the next download again.

Converted checkpoints are keyed by the sha256 of the source file and the converter version
(:data:`~segkit.model_zoo.sources.CONVERTER_VERSION`), so a new source file or a converter
fix converts again, and a second ``get`` loads the converted file without re-hashing the
download or touching the network.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .catalog import ZooEntry, ZooError
from .download import (DownloadError, Expected, cache_dir, download, file_digests, locked,
                       offline)

__all__ = ["VerifyResult", "cached_state", "checkpoint_path", "converted_path", "fetch",
           "pin_path", "raw_path", "verify"]

logger = logging.getLogger(__name__)


def raw_path(entry: ZooEntry) -> Path:
    """Where the publisher's file of ``entry`` is cached."""
    return cache_dir() / entry.filename


def pin_path(raw: Path) -> Path:
    """The sha256 pin next to a cached download."""
    return raw.with_name(raw.name + ".sha256")


def _needs_pin(entry: ZooEntry) -> bool:
    return not entry.sha256 or len(entry.sha256) < 64


def _expected(entry: ZooEntry) -> Expected:
    return Expected.checked(entry.sha256, entry.md5, entry.size_bytes)


def _read_pin(raw: Path) -> Optional[str]:
    try:
        value = pin_path(raw).read_text().split()[0].strip().lower()
    except (OSError, IndexError):
        return None
    return value if len(value) == 64 else None


def _write_pin(raw: Path, sha256: str) -> None:
    tmp = pin_path(raw).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{sha256}  {raw.name}\n")
    os.replace(tmp, pin_path(raw))


def _check_pin(entry: ZooEntry, raw: Path, sha256: str) -> None:
    """Compare with the pin, or write it (first use). Raises ZooError on a mismatch."""
    if not _needs_pin(entry):
        return
    pinned = _read_pin(raw)
    if pinned is None:
        _write_pin(raw, sha256)
        logger.info("Pinned sha256 %s of %s (trust on first use)", sha256, raw)
    elif pinned != sha256:
        raise ZooError(
            f"{raw} has sha256 {sha256}, but the first download of '{entry.name}' had {pinned} "
            f"(pinned in {pin_path(raw)}); the published file changed or was replaced. Delete "
            "the pin to trust the new file.")


def fetch(entry: ZooEntry, progress: bool = True) -> Path:
    """Download (or find in the cache) the publisher's file, checked as the module says.

    The URLs are tried in order (primary, then mirrors) until one gives a file that passes.

    Raises:
        DownloadError: every URL failed (the message has each reason), or offline uncached.
        ZooError: the file passes the publisher's checks but not its sha256 pin.
    """
    errors: List[str] = []
    path: Optional[Path] = None
    for url in entry.urls:
        try:
            path = download(url, entry.sha256, entry.filename, md5=entry.md5,
                            size=entry.size_bytes, progress=progress)
            break
        except DownloadError as e:
            if offline():
                raise  # the same cache file for every URL: one message says it
            errors.append(str(e))
    if path is None:
        raise DownloadError(f"cannot download '{entry.name}' from any of its {len(entry.urls)} "
                            "URL(s):\n  " + "\n  ".join(errors))
    if _needs_pin(entry):
        _check_pin(entry, path, file_digests(path)["sha256"])
    return path


def converted_path(entry: ZooEntry, source_sha256: str) -> Path:
    """The converted checkpoint of ``entry`` made from a source file with that sha256."""
    from .sources import CONVERTER_VERSION

    return cache_dir() / f"{entry.name}.segkit-v{CONVERTER_VERSION}-{source_sha256[:12]}.pth"


def _source_sha256(entry: ZooEntry, raw: Path) -> Optional[str]:
    """The source file's sha256 without reading it when known (full catalog hash or pin)."""
    if entry.sha256 and len(entry.sha256) == 64:
        return entry.sha256
    return _read_pin(raw)


def checkpoint_path(entry: ZooEntry, progress: bool = True) -> Path:
    """A segkit checkpoint of ``entry``: the download itself for ``source: segkit``, else the
    converted file, converted once (under a lock) and reused.

    Raises:
        DownloadError, ZooError: see :func:`fetch` and :func:`~segkit.model_zoo.sources.convert`.
    """
    raw = raw_path(entry)
    if entry.source != "segkit":
        known = _source_sha256(entry, raw)
        if known is not None and converted_path(entry, known).is_file():
            return converted_path(entry, known)  # no network, no hashing
    raw = fetch(entry, progress=progress)
    if entry.source == "segkit":
        return raw
    sha256 = _source_sha256(entry, raw) or file_digests(raw)["sha256"]
    dst = converted_path(entry, sha256)
    with locked(dst):
        if not dst.is_file():
            from .sources import convert

            logger.info("Converting %s (%s) into %s", raw, entry.source, dst)
            convert(entry, raw, dst, source_sha256=sha256)
    return dst


def cached_state(entry: ZooEntry) -> str:
    """``converted``, ``downloaded`` or ``no``: what of ``entry`` is in the cache (no hashing)."""
    raw = raw_path(entry)
    known = _source_sha256(entry, raw)
    if entry.source != "segkit" and known and converted_path(entry, known).is_file():
        return "converted"
    return "downloaded" if raw.is_file() else "no"


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: ``status`` is ``ok``, ``missing`` or ``corrupt``."""

    name: str
    status: str
    path: Path
    checks: str
    detail: str = ""


def verify(entry: ZooEntry) -> VerifyResult:
    """Re-hash the cached download of ``entry`` against the catalog and its pin.

    A file without a pin gets one (trust on first use, as for a download). Never downloads.
    """
    raw = raw_path(entry)
    result = VerifyResult(entry.name, "ok", raw, entry.hash_check())
    if not raw.is_file():
        result.status, result.detail = "missing", "not downloaded (segkit-zoo download NAME)"
        return result
    expected = _expected(entry)
    digests = file_digests(raw, ("sha256", *expected.algorithms()))
    problem = expected.mismatch(digests, raw.stat().st_size)
    if problem is None:
        try:
            _check_pin(entry, raw, digests["sha256"])
        except ZooError as e:
            problem = str(e)
    if problem is not None:
        result.status, result.detail = "corrupt", problem
    elif _needs_pin(entry):
        result.detail = f"sha256 {digests['sha256'][:16]}... matches the pin"
    return result

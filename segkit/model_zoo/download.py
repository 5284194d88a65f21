"""Download files (model weights) into segkit's cache, verified and safe under concurrency.

``download(url, sha256)`` returns the path of a local copy under :func:`cache_dir`::

    $SEGKIT_CACHE/model_zoo/<filename>     (SEGKIT_CACHE defaults to ~/.cache/segkit)

Behaviour:

* **Cache hit**: if the file is already cached and its hash verifies (or no hash was given), it
  is returned without touching the network. A cached file whose hash does *not* verify is
  downloaded again (and replaced).
* **Hash**: ``sha256`` is a full hex digest (64 chars) or a prefix of at least 8 hex chars, as
  publishers such as torchvision put in their file names (``resnet50-0676ba61.pth``);
  ``md5`` is an md5 digest or a prefix of at least 6 hex chars, which is what detectron2 puts
  in its file names (``model_final_f10217.pkl``); ``size`` is an exact byte count. Every
  expectation given is checked (one pass over the bytes computes both digests); comparison is
  case-insensitive. A 6-hex md5 prefix (24 bits) catches truncation and corruption, not a
  deliberate substitution: :mod:`segkit.model_zoo.store` adds a sha256 pin for such files.
* **Transport**: iopath fetches the bytes (``iopath.common.download.download``, i.e.
  ``urllib``'s ``urlretrieve``, which checks ``Content-Length``), with its tqdm progress bar
  only when ``progress`` is set and stderr is a terminal (no bar in CI logs). ``urlretrieve``
  takes no timeout, so ``timeout`` is set as the process's socket default for the transfer
  (and restored after). iopath's own cache (``HTTPURLHandler``) is not used: it keys files by
  URL under its own folder and checks no hash; the cache, lock, checks and retries below are
  segkit's.
* **Atomic**: iopath downloads into a private temporary folder inside the cache directory; the
  file is fsync'ed, checked against the hash, then renamed into place with ``os.replace``, and
  the folder is removed whatever happens. A failed or interrupted download never leaves a
  partial file under the final name.
* **Retries**: a connection error, timeout, HTTP 5xx/408/429 or a truncated body (fewer bytes than
  ``Content-Length``, or the connection dropped) is retried up to ``retries`` times with a
  short exponential backoff (``backoff * 2**k`` seconds). Other HTTP errors (404, 403, ...)
  fail at once, as do a local I/O error and an empty body (which iopath refuses). A hash
  mismatch is retried at most once (``min(retries, 1)``: a second mismatch means the expected
  hash or the published file is wrong, and downloading again will not help), then fails with
  the expected and actual digests.
* **Concurrency**: an exclusive ``fcntl.flock`` on ``<file>.lock`` (next to the file) is held
  around check-cache + download, so processes fetching the same file download it once; the
  others wait and then see the cache hit. (Without ``fcntl``, e.g. on Windows, there is no
  lock; the atomic rename still keeps the cache consistent.)
* ``SEGKIT_OFFLINE=1`` (also ``true``/``yes``/``on``): the network is never touched; the cached
  file is returned if present and verified, otherwise :class:`DownloadError` names the file,
  the URL and the variable.
* ``SEGKIT_ZOO_MIRROR=<base>``: the URL's scheme and host (``scheme://host[:port]``) are
  replaced by ``<base>`` (which may carry a path prefix); the URL's path and query are kept.
  E.g. with ``SEGKIT_ZOO_MIRROR=http://mirror.lan/zoo``,
  ``https://download.pytorch.org/models/r50-0676ba61.pth`` is fetched from
  ``http://mirror.lan/zoo/models/r50-0676ba61.pth``. The cache file name still comes from the
  original URL (or ``filename``), so mirrored and direct downloads share the cache.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Iterator, Optional

import iopath.common.download as iopath_download

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from .digests import Expected, file_digests, file_sha256

__all__ = ["cache_dir", "download", "DownloadError", "Expected", "file_digests", "file_sha256",
           "locked", "offline"]

logger = logging.getLogger(__name__)

DEFAULT_BACKOFF = 0.5  # seconds; attempt k (from 0) waits backoff * 2**k before retrying
OFFLINE_ENV = "SEGKIT_OFFLINE"
MIRROR_ENV = "SEGKIT_ZOO_MIRROR"
_RETRY_HTTP_CODES = {408, 429}


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status, truncated body, hash mismatch, offline mode)."""


class _Retryable(Exception):
    """Internal: this attempt failed in a way that another attempt may fix."""


class _HashMismatch(Exception):
    """Internal: the body was complete but its hash or size did not match."""


def _cache_root() -> Path:
    # same rule as segkit.data.embedded.embedded_root
    cache = os.environ.get("SEGKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "segkit")
    return Path(cache)


def cache_dir() -> Path:
    """``$SEGKIT_CACHE/model_zoo`` (``SEGKIT_CACHE`` defaults to ``~/.cache/segkit``)."""
    return _cache_root() / "model_zoo"


def offline() -> bool:
    """Whether ``SEGKIT_OFFLINE`` forbids the network (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _mirrored(url: str) -> str:
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    rest = parts.path if parts.path.startswith("/") else "/" + parts.path
    if parts.query:
        rest += "?" + parts.query
    return mirror.rstrip("/") + rest


def _mismatch(path: Path, expected: Expected) -> Optional[str]:
    """None when the file fits ``expected``, else what differs (expected and actual)."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:  # cheap check first, no read
        return expected.mismatch({}, size)
    algorithms = expected.algorithms()
    return expected.mismatch(file_digests(path, algorithms) if algorithms else {}, size)


def _verified(path: Path, expected: Expected) -> bool:
    return path.is_file() and _mismatch(path, expected) is None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock``; the lock file is left in place (removing it races)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """urlretrieve (under iopath) takes no timeout: set the socket default while it runs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _fetch_once(url: str, dest: Path, expected: Expected, progress: bool,
                timeout: float) -> None:
    """One attempt: iopath downloads ``url`` into a private folder next to ``dest``; the file
    is fsync'ed, verified and renamed to ``dest``. Failures are sorted into _Retryable,
    _HashMismatch and DownloadError (fail at once)."""
    tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part"))
    try:
        try:
            with _socket_timeout(timeout):
                part = Path(iopath_download.download(
                    url, str(tmpdir), filename=dest.name,
                    progress=progress and sys.stderr.isatty()))
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in _RETRY_HTTP_CODES:
                raise _Retryable(f"HTTP {e.code} {e.reason}") from e
            raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
        except urllib.error.ContentTooShortError as e:  # fewer bytes than Content-Length
            raise _Retryable(f"truncated: {e.reason}") from e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError) as e:  # refused, reset, dropped mid-body, timed out
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
        except OSError as e:  # local I/O error, or iopath's "Downloaded an empty file"
            raise DownloadError(f"cannot download {url}: {e}") from e

        with open(part, "rb") as f:
            os.fsync(f.fileno())
        problem = _mismatch(part, expected)
        if problem is not None:
            raise _HashMismatch(f"{problem} for {url}")
        os.replace(part, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def download(url: str, sha256: Optional[str] = None, filename: Optional[str] = None, *,
             md5: Optional[str] = None, size: Optional[int] = None,
             retries: int = 3, progress: bool = True, timeout: float = 60,
             backoff: Optional[float] = None) -> Path:
    """Return the path of a verified local copy of ``url`` in :func:`cache_dir`.

    Args:
        url: http(s) URL of the file.
        sha256: expected sha256, full hex digest or a prefix of >= 8 hex chars.
        filename: name in the cache; default the last component of the URL's path.
        md5: expected md5, full hex digest or a prefix of >= 6 hex chars.
        size: expected size in bytes. With none of ``sha256``, ``md5`` and ``size``, nothing is
            verified (any cached file with that name is then a hit).
        retries: how many times a transient failure (connection error, HTTP 5xx/408/429,
            truncated body) is retried after the first attempt; a hash mismatch is retried at
            most once.
        progress: show a tqdm bar (only when stderr is a TTY).
        timeout: socket timeout in seconds, per connection / read.
        backoff: base delay before a retry, ``backoff * 2**k`` seconds; default
            ``DEFAULT_BACKOFF``.

    Raises:
        DownloadError: on 4xx, exhausted retries, hash mismatch, or offline without a cache.
        ValueError: on a malformed ``sha256``, ``md5``, ``size`` or ``filename``.

    See the module docstring for ``SEGKIT_OFFLINE`` and ``SEGKIT_ZOO_MIRROR``.
    """
    expected = Expected.checked(sha256, md5, size)
    if filename is None:
        filename = os.path.basename(urllib.parse.urlsplit(url).path)
    if not filename or filename in {".", ".."} or "/" in filename or os.sep in filename:
        raise ValueError(f"cannot derive a file name from {url!r}; pass filename=")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    backoff = DEFAULT_BACKOFF if backoff is None else backoff

    directory = cache_dir()
    dest = directory / filename
    if offline():
        if _verified(dest, expected):
            return dest
        what = ("is not cached" if not dest.exists()
                else f"is cached but does not match {expected.describe()}")
        raise DownloadError(f"{OFFLINE_ENV} is set, so {url} cannot be downloaded, and {dest} "
                            f"{what}. Copy the file there or unset {OFFLINE_ENV}.")
    if _verified(dest, expected):  # fast path, no lock
        return dest

    directory.mkdir(parents=True, exist_ok=True)
    source = _mirrored(url)
    with locked(dest):
        if _verified(dest, expected):  # another process finished it while we waited
            return dest
        if dest.exists():
            logger.warning("%s does not match %s; downloading it again", dest,
                           expected.describe())
        hash_retries = min(retries, 1)
        attempt = 0
        while True:
            try:
                logger.info("Downloading %s to %s", source, dest)
                _fetch_once(source, dest, expected, progress, timeout)
                return dest
            except _Retryable as e:
                if attempt >= retries:
                    raise DownloadError(f"cannot download {source} after {attempt + 1} "
                                        f"attempt(s): {e}") from e
                logger.warning("Download of %s failed (%s); retrying", source, e)
            except _HashMismatch as e:
                if hash_retries <= 0:
                    raise DownloadError(str(e)) from None
                hash_retries -= 1
                logger.warning("%s; downloading again", e)
            time.sleep(backoff * 2 ** attempt)
            attempt += 1

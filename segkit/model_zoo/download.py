"""Download files (model weights) into segkit's cache, verified and safe under concurrency.

``download(url, sha256)`` returns the path of a local copy under :func:`cache_dir`::

    $SEGKIT_CACHE/model_zoo/<filename>     (SEGKIT_CACHE defaults to ~/.cache/segkit)

Behaviour:

* **Cache hit**: if the file is already cached and its hash verifies (or no hash was given), it
  is returned without touching the network. A cached file whose hash does *not* verify is
  downloaded again (and replaced).
* **Hash**: ``sha256`` is a full hex digest (64 chars) or a prefix of at least 8 hex chars, as
  publishers such as torchvision put in their file names (``resnet50-0676ba61.pth``);
  comparison is case-insensitive.
* **Atomic**: bytes go to a temporary file in the cache directory, which is fsync'ed, checked
  against ``Content-Length`` and the hash, then renamed into place with ``os.replace``. A
  failed or interrupted download never leaves a partial file under the final name.
* **Retries**: a connection error, timeout, HTTP 5xx/408/429 or a truncated body (fewer bytes than
  ``Content-Length``, or the connection dropped) is retried up to ``retries`` times with a
  short exponential backoff (``backoff * 2**k`` seconds). Other HTTP errors (404, 403, ...)
  fail at once. A hash mismatch is retried at most once (``min(retries, 1)``: a second
  mismatch means the expected hash or the published file is wrong, and downloading again
  will not help), then fails with the expected and actual digests.
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
import hashlib
import http.client
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["cache_dir", "download", "DownloadError", "file_sha256"]

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
DEFAULT_BACKOFF = 0.5  # seconds; attempt k (from 0) waits backoff * 2**k before retrying
OFFLINE_ENV = "SEGKIT_OFFLINE"
MIRROR_ENV = "SEGKIT_ZOO_MIRROR"
_RETRY_HTTP_CODES = {408, 429}


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status, truncated body, hash mismatch, offline mode)."""


class _Retryable(Exception):
    """Internal: this attempt failed in a way that another attempt may fix."""


class _HashMismatch(Exception):
    """Internal: the body was complete but its sha256 did not match."""


def _cache_root() -> Path:
    # same rule as segkit.data.embedded.embedded_root
    cache = os.environ.get("SEGKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "segkit")
    return Path(cache)


def cache_dir() -> Path:
    """``$SEGKIT_CACHE/model_zoo`` (``SEGKIT_CACHE`` defaults to ``~/.cache/segkit``)."""
    return _cache_root() / "model_zoo"


def _offline() -> bool:
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


def _check_sha256(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    h = sha256.strip().lower()
    if not (8 <= len(h) <= 64) or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"sha256 must be 8 to 64 hex characters (a digest or its prefix), "
                         f"got {sha256!r}")
    return h


def file_sha256(path: os.PathLike | str) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, sha256: Optional[str]) -> bool:
    if not path.is_file():
        return False
    return sha256 is None or file_sha256(path).startswith(sha256)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
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


def _fetch_once(url: str, dest: Path, sha256: Optional[str], progress: bool,
                timeout: float) -> None:
    """One attempt: stream ``url`` into a temp file next to ``dest``, verify, rename."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "segkit-model-zoo"})
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in _RETRY_HTTP_CODES:
                raise _Retryable(f"HTTP {e.code} {e.reason}") from e
            raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout,
                ConnectionError, TimeoutError) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e

        with resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest = hashlib.sha256()
            received = 0
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=dest.name, leave=False,
                       disable=not (progress and sys.stderr.isatty()))
            try:
                with os.fdopen(fd, "wb") as f:
                    fd = -1  # now owned by f
                    while True:
                        try:
                            chunk = resp.read(CHUNK_SIZE)
                        except (http.client.HTTPException, OSError) as e:
                            # IncompleteRead, reset connection, timeout mid-body
                            raise _Retryable(f"connection dropped after {received} bytes "
                                             f"({type(e).__name__}: {e})") from e
                        if not chunk:
                            break
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                bar.close()

        if total is not None and received != total:
            raise _Retryable(f"truncated: got {received} of {total} bytes")
        actual = digest.hexdigest()
        if sha256 is not None and not actual.startswith(sha256):
            raise _HashMismatch(f"sha256 mismatch for {url}: expected {sha256}"
                                f"{'' if len(sha256) == 64 else '... (prefix)'}, got {actual}")
        os.replace(tmp, dest)
        tmp = None
    finally:
        if fd != -1:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def download(url: str, sha256: Optional[str] = None, filename: Optional[str] = None, *,
             retries: int = 3, progress: bool = True, timeout: float = 60,
             backoff: Optional[float] = None) -> Path:
    """Return the path of a verified local copy of ``url`` in :func:`cache_dir`.

    Args:
        url: http(s) URL of the file.
        sha256: expected sha256, full hex digest or a prefix of >= 8 hex chars; ``None`` skips
            verification (any cached file with that name is then a hit).
        filename: name in the cache; default the last component of the URL's path.
        retries: how many times a transient failure (connection error, HTTP 5xx/408/429,
            truncated body) is retried after the first attempt; a hash mismatch is retried at
            most once.
        progress: show a tqdm bar (only when stderr is a TTY).
        timeout: socket timeout in seconds, per connection / read.
        backoff: base delay before a retry, ``backoff * 2**k`` seconds; default
            ``DEFAULT_BACKOFF``.

    Raises:
        DownloadError: on 4xx, exhausted retries, hash mismatch, or offline without a cache.
        ValueError: on a malformed ``sha256`` or ``filename``.

    See the module docstring for ``SEGKIT_OFFLINE`` and ``SEGKIT_ZOO_MIRROR``.
    """
    sha256 = _check_sha256(sha256)
    if filename is None:
        filename = os.path.basename(urllib.parse.urlsplit(url).path)
    if not filename or filename in {".", ".."} or "/" in filename or os.sep in filename:
        raise ValueError(f"cannot derive a file name from {url!r}; pass filename=")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    backoff = DEFAULT_BACKOFF if backoff is None else backoff

    directory = cache_dir()
    dest = directory / filename
    if _offline():
        if _verified(dest, sha256):
            return dest
        what = "is not cached" if not dest.exists() else f"is cached but its sha256 is not {sha256}"
        raise DownloadError(f"{OFFLINE_ENV} is set, so {url} cannot be downloaded, and {dest} "
                            f"{what}. Copy the file there or unset {OFFLINE_ENV}.")
    if _verified(dest, sha256):  # fast path, no lock
        return dest

    directory.mkdir(parents=True, exist_ok=True)
    source = _mirrored(url)
    with _locked(dest):
        if _verified(dest, sha256):  # another process finished it while we waited
            return dest
        if dest.exists():
            logger.warning("%s does not match sha256 %s; downloading it again", dest, sha256)
        hash_retries = min(retries, 1)
        attempt = 0
        while True:
            try:
                logger.info("Downloading %s to %s", source, dest)
                _fetch_once(source, dest, sha256, progress, timeout)
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

"""File digests and the expectations a download is checked against (hash prefixes, size).

Publishers give digest prefixes in their file names: torchvision the first 8+ hex digits of the
sha256 (torch.hub's ``check_hash`` convention), detectron2 the first 6 of the md5.
:class:`Expected` holds what a file must match; one read of the file computes every digest
needed (:func:`file_digests`).
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

__all__ = ["CHUNK_SIZE", "Expected", "file_digests", "file_sha256"]

CHUNK_SIZE = 1 << 20

# algorithm -> (shortest accepted prefix, full digest length), in hex characters
_DIGEST_LENGTHS = {"sha256": (8, 64), "md5": (6, 32)}


def _check_digest(value: Optional[str], algorithm: str) -> Optional[str]:
    if value is None:
        return None
    shortest, full = _DIGEST_LENGTHS[algorithm]
    h = value.strip().lower()
    if not (shortest <= len(h) <= full) or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"{algorithm} must be {shortest} to {full} hex characters (a digest or "
                         f"its prefix), got {value!r}")
    return h


class Expected(NamedTuple):
    """What a file must match: hex digests or their prefixes (lower case) and a byte count;
    ``None`` fields are not checked."""

    sha256: Optional[str] = None
    md5: Optional[str] = None
    size: Optional[int] = None

    @classmethod
    def checked(cls, sha256: Optional[str] = None, md5: Optional[str] = None,
                size: Optional[int] = None) -> "Expected":
        """Validate and normalise the arguments (ValueError names the bad one)."""
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"size must be a byte count >= 0, got {size!r}")
        return cls(_check_digest(sha256, "sha256"), _check_digest(md5, "md5"), size)

    def algorithms(self) -> List[str]:
        return [a for a in _DIGEST_LENGTHS if getattr(self, a) is not None]

    def mismatch(self, digests: Dict[str, str], size: int) -> Optional[str]:
        """None when ``digests`` / ``size`` fit, else what differs (expected and actual)."""
        if self.size is not None and size != self.size:
            return f"size {size} bytes, expected {self.size}"
        for algorithm in self.algorithms():
            want = getattr(self, algorithm)
            if not digests[algorithm].startswith(want):
                kind = "" if len(want) == _DIGEST_LENGTHS[algorithm][1] else "... (prefix)"
                return f"{algorithm} mismatch: expected {want}{kind}, got {digests[algorithm]}"
        return None

    def describe(self) -> str:
        parts = [f"{a} {getattr(self, a)}" for a in self.algorithms()]
        if self.size is not None:
            parts.append(f"size {self.size}")
        return ", ".join(parts) or "nothing (no hash or size given)"


def file_digests(path: os.PathLike | str, algorithms: Sequence[str] = ("sha256",)) -> Dict[str, str]:
    """Hex digests of a file's content, all computed in one read: ``{algorithm: hex}``."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
            for h in hashes.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashes.items()}


def file_sha256(path: os.PathLike | str) -> str:
    """Hex sha256 of a file's content."""
    return file_digests(path)["sha256"]

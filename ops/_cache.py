"""The on-disk build cache shared by the NVRTC and emulation builders: one entry per content key.

An entry is a folder named by the sha256 of everything that changes the build; it holds the built
file and ``<file>.sha256``. A lookup trusts the file only when its hash matches, so a truncated or
corrupt entry is rebuilt. Builders take an flock on the entry and write to a temporary file renamed
into place, so concurrent processes build once and readers never see half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def cache_root() -> Path:
    """Where built kernels live: $MSDA_CACHE_DIR, default ~/.cache/msda_ops."""
    return Path(os.environ.get("MSDA_CACHE_DIR") or Path.home() / ".cache" / "msda_ops")


def content_key(parts: Iterable[bytes | str]) -> str:
    """sha256 over length-prefixed parts (so ("ab", "c") and ("a", "bc") differ)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _intact(path: Path) -> bool:
    stamp = path.with_name(path.name + ".sha256")
    try:
        return stamp.read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False


def cached(key: str, filename: str, produce: Callable[[Path], None]) -> Path:
    """The path of ``filename`` in cache entry ``key``, calling ``produce(tmp_path)`` to write it
    when the entry is missing or corrupt. ``produce`` raises to report a failed build; nothing is
    then left in the entry but its lock file."""
    entry = cache_root() / key
    path = entry / filename
    if _intact(path):
        return path
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _intact(path):  # built by another process while this one waited
            return path
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=f".{filename}-")
        os.close(fd)
        try:
            produce(Path(tmp))
            digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
            stamp_tmp = Path(tmp + ".sha256")
            stamp_tmp.write_text(digest + "\n")
            os.replace(tmp, path)  # atomic: readers see the old state or the whole new file
            os.replace(stamp_tmp, path.with_name(filename + ".sha256"))
        finally:
            for leftover in (tmp, tmp + ".sha256"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    return path

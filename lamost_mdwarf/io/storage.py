"""Where stores live: local paths or fsspec URLs, and the single-writer lock.

A store location is a local path, a ``file://`` URL, or any fsspec URL (``s3://bucket/x``
when s3fs is installed, ``memory://x`` for tests). Local paths use zarr's
:class:`~zarr.storage.LocalStore`, whose chunk and metadata writes are atomic
(write-to-temporary then rename); other URLs use :class:`~zarr.storage.FsspecStore`,
where object stores make single-object writes atomic.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import zarr
import zarr.storage

__all__ = [
    "StoreLocation",
    "StoreLockedError",
    "WriterLock",
    "resolve_location",
]


class StoreLockedError(RuntimeError):
    """Another process is writing to the store."""


@dataclass(frozen=True)
class StoreLocation:
    """A resolved store location.

    Attributes
    ----------
    url : str
        What the user gave (for messages).
    fs : fsspec.AbstractFileSystem
        Filesystem holding the store.
    root : str
        Path of the store inside ``fs``.
    is_local : bool
        True for the local filesystem.
    """

    url: str
    fs: Any
    root: str
    is_local: bool

    def zarr_store(self, read_only: bool = False) -> zarr.abc.store.Store:
        """A zarr store object for this location."""
        if self.is_local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        fs = self.fs
        if not getattr(fs, "async_impl", False):  # e.g. memory://: zarr needs an async filesystem
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs = AsyncFileSystemWrapper(fs, asynchronous=True)
        return zarr.storage.FsspecStore(fs, path=self.root, read_only=read_only)

    def exists(self) -> bool:
        """Whether something (a zarr group) already exists at the location."""
        return bool(self.fs.exists(self._join("zarr.json")))

    def _join(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def writable(self) -> bool:
        """Best-effort check that the location accepts writes (local only)."""
        if not self.is_local:
            return True
        probe = Path(self.root)
        while not probe.exists():
            probe = probe.parent
        return os.access(probe, os.W_OK)


def resolve_location(url: str | os.PathLike) -> StoreLocation:
    """Resolve a path or URL to a :class:`StoreLocation`.

    Parameters
    ----------
    url : str or path-like
        Local path, ``file://`` URL or other fsspec URL.
    """
    text = os.fspath(url)
    if "://" not in text or text.startswith("file://"):
        local = text[len("file://"):] if text.startswith("file://") else text
        root = str(Path(local).expanduser().resolve())
        return StoreLocation(text, fsspec.filesystem("file"), root, True)
    fs, root = fsspec.core.url_to_fs(text)
    return StoreLocation(text, fs, root, False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """An exclusive lock file ``<store>.lock`` (beside the store) held by one writer.

    The lock lives outside the Zarr hierarchy so that readers (``xarray.open_zarr``) never
    see a foreign object in the store.

    A lock left by a killed process on this host is detected (its pid is gone) and taken
    over; a live lock makes :meth:`acquire` raise :class:`StoreLockedError`.
    """

    def __init__(self, location: StoreLocation, purpose: str) -> None:
        self.location = location
        self.purpose = purpose
        self.path = f"{location.root.rstrip('/')}.lock"
        self.held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.location.fs.open(self.path, "r") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}

    def acquire(self) -> "WriterLock":
        """Take the lock or raise :class:`StoreLockedError` naming the holder."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "purpose": self.purpose}
        payload = json.dumps(info)
        fs = self.location.fs
        parent = self.path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        for _ in range(2):
            if self.location.is_local:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as handle:
                        handle.write(payload)
                    self.held = True
                    return self
            elif not fs.exists(self.path):
                with fs.open(self.path, "w") as handle:
                    handle.write(payload)
                self.held = True
                return self
            holder = self._read() or {}
            stale = (
                holder.get("host") == info["host"]
                and isinstance(holder.get("pid"), int)
                and not _pid_alive(holder["pid"])
            )
            if not stale:
                since = holder.get("since")
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "unknown time"
                raise StoreLockedError(
                    f"store {self.location.url} is in use by another {holder.get('purpose', 'writer')} "
                    f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {when}). "
                    f"Wait for it to finish; if that process no longer exists, delete {self.path}."
                )
            fs.rm(self.path)  # the holder was killed: take over
        raise StoreLockedError(f"could not acquire {self.path}")

    def release(self) -> None:
        """Release the lock if held."""
        if self.held:
            try:
                self.location.fs.rm(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

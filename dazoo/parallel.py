"""Threads for the NumPy/SciPy work around the networks: resampling onto native grids and
gzip compression, which release the GIL and would otherwise run on one core while the others
wait (a 256^3 warp: three trilinear resamplings and 200 MB of deflate).

``DAZOO_THREADS`` sets the number of threads (default: the cores this process may use, at
most 16); 1 runs everything in the calling thread, exactly as a plain loop.

This module imports the standard library only.
"""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

__all__ = ["workers", "map_ordered", "slabs", "GzipWriter"]

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCK = threading.Lock()
_INSIDE = threading.local()  # set in the pool's threads: nested calls run serially


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start afresh."""
    global _POOL, _POOL_SIZE, _LOCK
    _POOL, _POOL_SIZE, _LOCK = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _mark_inside() -> None:
    _INSIDE.active = True


def workers() -> int:
    """Threads to use: ``DAZOO_THREADS`` when set (>= 1), else the cores available to this
    process (at most 16)."""
    value = os.environ.get("DAZOO_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_SIZE != size:
            # A pool of another size is left to finish what it runs (not shut down under a
            # thread that may still use it).
            _POOL = ThreadPoolExecutor(size, thread_name_prefix="dazoo", initializer=_mark_inside)
            _POOL_SIZE = size
        return _POOL


def map_ordered(function: Callable, items: Iterable) -> list:
    """``[function(item) for item in items]``, the items spread over :func:`workers`
    threads (in the calling thread when that is 1, there is one item, or the caller is one
    of the pool's threads: no nested waits). Exceptions are raised as by the loop (the first
    item's first)."""
    items = list(items)
    size = workers()
    if size == 1 or len(items) < 2 or getattr(_INSIDE, "active", False):
        return [function(item) for item in items]
    return list(_pool(size).map(function, items))


def slabs(length: int, pieces: int | None = None, *, at_most: int | None = None
          ) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``0..length`` in near-equal consecutive slabs:
    ``pieces`` of them (default: twice :func:`workers`, one when that is 1), or more where a
    slab would exceed ``at_most``."""
    length = int(length)
    if length <= 0:
        return []
    size = workers()
    count = int(pieces) if pieces else (1 if size == 1 else 2 * size)
    if at_most:
        count = max(count, -(-length // int(at_most)))
    count = max(1, min(count, length))
    bounds = [length * p // count for p in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class GzipWriter(io.IOBase):
    """A write-only binary file that writes one gzip member (RFC 1952), deflating blocks of
    ``block`` bytes in :func:`workers` threads, as pigz does: each block is raw deflate ended
    by a sync flush (byte-aligned, not final), the last one finished; any gzip reader reads
    it as one stream. With one thread the blocks deflate in turn.

    ``tell`` counts the uncompressed bytes; ``seek`` only forward (writes zeros), as a
    streamed gzip file allows. ``close`` writes the trailer and closes the file.
    """

    def __init__(self, path: str | os.PathLike, *, level: int = 1, block: int = 1 << 23):
        self._file = open(path, "wb")
        self._level, self._block = int(level), int(block)
        self._buffer = bytearray()
        self._pending: deque = deque()
        self._size = self._crc = 0
        self._threads = 1 if getattr(_INSIDE, "active", False) else workers()
        self._aborted = False
        self.mode = "wb"
        self.name = os.fspath(path)
        # ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=unknown
        self._file.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    # file protocol ------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self._size + offset}.get(whence)
        if target is None or target < self._size:
            raise OSError("GzipWriter only seeks forward from the start or the current place")
        if target > self._size:
            self.write(bytes(target - self._size))
        return self._size

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._crc = zlib.crc32(view, self._crc)
        self._size += len(view)
        self._buffer += view
        while len(self._buffer) >= self._block:
            piece = bytes(self._buffer[:self._block])
            del self._buffer[:self._block]
            self._submit(piece, final=False)
        return len(view)

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._aborted:
                self._submit(bytes(self._buffer), final=True)
                self._buffer = bytearray()
                self._drain(0)
                self._file.write(struct.pack("<II", self._crc & 0xFFFFFFFF,
                                             self._size & 0xFFFFFFFF))
        finally:
            self._pending.clear()
            self._file.close()
            super().close()

    def __exit__(self, *exc) -> None:
        # On an error the file is left unfinished (the caller removes it).
        self._aborted = exc[0] is not None
        self.close()

    # deflate ------------------------------------------------------------------------
    def _deflate(self, piece: bytes, final: bool) -> bytes:
        compressor = zlib.compressobj(self._level, zlib.DEFLATED, -zlib.MAX_WBITS)
        return compressor.compress(piece) + compressor.flush(
            zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)

    def _submit(self, piece: bytes, final: bool) -> None:
        if self._threads == 1:
            self._file.write(self._deflate(piece, final))
            return
        self._pending.append(_pool(self._threads).submit(self._deflate, piece, final))
        self._drain(2 * self._threads)  # bounded memory: a few blocks in flight

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._file.write(self._pending.popleft().result())


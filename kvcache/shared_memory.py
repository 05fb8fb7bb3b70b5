"""Named POSIX shared-memory files that do not outlive their owner.

A KV pool that another process writes into must have a name that process can open, for as long as
the owner lives (a prefill instance that connects later opens it by name too). So, unlike the
transfer layer's slabs, the name cannot be unlinked right after the peer mapped it. Instead:

    owner: create /dev/shm/<prefix>_<pid>_<random> (O_EXCL, 0600, pages reserved with fallocate)
           └─ watchdog process (own session) holding the read end of a pipe
    owner exits in any way, kill -9 included ─► the pipe's write end closes ─► watchdog unlinks

plus an unlink in close() and at interpreter exit, and a sweep at creation of files whose owner pid
no longer exists (left only if the watchdog itself was killed with its owner). An unlinked name
frees its memory once the last mapping goes: processes that mapped it keep working on their copy.
"""
from __future__ import annotations

import atexit
import logging
import mmap
import os
import re
import secrets
import subprocess
import sys

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^(?P<prefix>[a-z][a-z0-9]*)_(?P<pid>[0-9]+)_[0-9a-f]{8,}$")

# Runs in the watchdog: ignore signals meant for the owner's process group or terminal, wait for the
# owner's end of the pipe to close, then remove the names. -S -I: no site packages, fast to start.
_WATCHDOG = (
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\n"
    "sys.stdin.buffer.read()\n"
    "for path in sys.argv[1:]:\n"
    "    try: os.unlink(path)\n"
    "    except OSError: pass\n")


class SharedFile:
    """A shared-memory file this process created. `name` opens it from another process
    (`map_region`); close() removes the name (mappings stay valid)."""

    def __init__(self, prefix: str, num_bytes: int) -> None:
        """Create and size the file; OSError (e.g. ENOSPC when /dev/shm is too small) if it cannot
        be backed by memory now: every page is reserved here, so a later write never faults (SIGBUS)."""
        if not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
            raise ValueError(f"shared-memory prefix must be lowercase letters and digits, got {prefix!r}")
        if num_bytes < 1:
            raise ValueError(f"a shared-memory file needs at least one byte, got {num_bytes}")
        sweep_stale(prefix)
        self.name = f"{prefix}_{os.getpid()}_{secrets.token_hex(6)}"
        self.path = os.path.join(SHM_DIR, self.name)
        self.num_bytes = num_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._closed = False
        try:
            os.posix_fallocate(fd, 0, num_bytes)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self._watchdog = _start_watchdog(self.path)
        atexit.register(self.close)

    def close(self) -> None:
        """Remove the name (idempotent). Mappings, here and in peers, stay valid until unmapped."""
        if self._closed:
            return
        self._closed = True
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._watchdog is not None:
            self._watchdog.stdin.close()  # the watchdog finds nothing left to remove and exits
            try:
                self._watchdog.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        atexit.unregister(self.close)


def _start_watchdog(path: str) -> subprocess.Popen | None:
    try:
        return subprocess.Popen([sys.executable, "-S", "-I", "-c", _WATCHDOG, path], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:  # the file still goes at close() or exit; a kill -9 leaves it to the sweep
        logger.warning("no watchdog for shared-memory file %s (%s): a kill -9 of this process would "
                       "leave it until the next sweep", path, e)
        return None


def sweep_stale(prefix: str) -> list[str]:
    """Remove files of this prefix whose owner process is gone; returns their names."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match is None or match["prefix"] != prefix or _alive(int(match["pid"])):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    if removed:
        logger.info("removed %d shared-memory file(s) left by processes that no longer exist: %s",
                    len(removed), ", ".join(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: not ours to judge
    return True


def check_name(name: str) -> None:
    """ValueError unless name is one SharedFile could have made (no path tricks from a peer)."""
    if not _NAME.match(name):
        raise ValueError(f"not a pdserve shared-memory name: {name!r}")


def map_region(name: str, offset: int, num_bytes: int, writable: bool) -> mmap.mmap:
    """Map [offset, offset + num_bytes) of another process's SharedFile (offset page-aligned).
    OSError if it cannot be opened (gone, another user's); ValueError if too small."""
    check_name(name)
    if offset % mmap.ALLOCATIONGRANULARITY:
        raise ValueError(f"offset {offset} is not a multiple of the page size {mmap.ALLOCATIONGRANULARITY}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if offset + num_bytes > size:
            raise ValueError(f"shared-memory file {name} is {size} bytes, the region needs {offset + num_bytes}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, num_bytes, mmap.MAP_SHARED, prot, offset=offset)
    finally:
        os.close(fd)


def map_own(shared: SharedFile) -> mmap.mmap:
    """A read-write mapping of the whole file, for its owner."""
    fd = os.open(shared.path, os.O_RDWR)
    try:
        return mmap.mmap(fd, shared.num_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def page_align(num_bytes: int) -> int:
    page = mmap.ALLOCATIONGRANULARITY
    return -(-num_bytes // page) * page

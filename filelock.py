"""The lock Mailroom's processes take in turn before they write to one SQLite file.

``FileLock(path).acquire(timeout)`` takes an exclusive ``flock`` on ``path`` within
``timeout`` seconds, without polling: when the lock is free, one non-blocking ``flock``
takes it; when another process holds it, a daemon thread of this lock waits in the
blocking ``flock`` (the kernel wakes it the moment the holder lets go) and hands the lock
over to the caller, or, if the caller gave up meanwhile, lets go of it at once (Linux:
the thread opens the file again through ``/proc/self/fd``). A blocking
``flock`` has no timeout of its own, hence that second thread; a daemon, so that a lock
another process never releases cannot hold up this one's exit.

Blocking calls: use it from a worker thread (store.py's writer thread), never the event
loop.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
from pathlib import Path


class FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._held: int | None = None  # the descriptor that holds the lock
        self._requests: queue.SimpleQueue[tuple[int, _Handover] | None] = queue.SimpleQueue()
        self._waiter: threading.Thread | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the lock within ``timeout`` seconds; True once held, False if not."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            self._held = self._fd
            return True
        if self._waiter is None:
            self._waiter = threading.Thread(
                target=_wait_for_locks,
                args=(self._requests,),
                name=f"flock-{self.path.name}",
                daemon=True,
            )
            self._waiter.start()
        # The waiting thread locks the same file through an open file of its own (a lock
        # belongs to the open file): if we give up, the lock it gets later is its own to
        # drop, and never one we took since.
        fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
        handover = _Handover()
        self._requests.put((fd, handover))
        if not handover.wait(timeout):
            return False
        self._held = fd
        return True

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            if held != self._fd:
                os.close(held)

    def close(self) -> None:
        """Release the lock and close the file; the waiting thread ends once it is free."""
        self.release()
        if self._waiter is not None:
            self._requests.put(None)
            self._waiter = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class _Handover:
    """One contended acquire: granted by the waiting thread or abandoned by the caller,
    whichever comes first (under a mutex: never both)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._granted = threading.Event()
        self._abandoned = False
        self._error: OSError | None = None

    def grant(self) -> bool:
        """The lock is held for the caller: False if the caller gave up already."""
        with self._mutex:
            if self._abandoned:
                return False
            self._granted.set()
            return True

    def fail(self, error: OSError) -> None:
        """The blocking flock failed: the caller gets the error."""
        with self._mutex:
            self._error = error
            self._granted.set()

    def wait(self, timeout: float) -> bool:
        """True once granted; False (abandoned) if not within ``timeout`` seconds."""
        self._granted.wait(timeout)
        with self._mutex:
            if not self._granted.is_set():
                self._abandoned = True
                return False
        if self._error is not None:
            raise self._error
        return True


def _wait_for_locks(requests: queue.SimpleQueue[tuple[int, _Handover] | None]) -> None:
    """The waiting thread: one blocking flock per contended acquire, in order. A granted
    file is the caller's (FileLock.release closes it)."""
    while (request := requests.get()) is not None:
        fd, handover = request
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            handover.fail(exc)
            continue
        if not handover.grant():
            os.close(fd)  # given up meanwhile: closing the file drops its lock

"""One training run per train dir: an advisory lock that a crashed run cannot leave stuck.

Two runs writing one train dir would interleave their checkpoints (and one of them fails
when both save the same step). The lock is `flock` on `TRAIN_DIR/train.lock`: the kernel
releases it when its process ends, however it ends (kill -9, crash, power loss), so a
leftover lock file never blocks the next run. The file names the holder (pid, host,
start time, command) for the message the second run prints.
"""

import datetime
import errno
import fcntl
import os
import socket
import sys

from absl import logging

from mtss_train.errors import MtssError

LOCK_FILE = "train.lock"


class TrainDirLock:
    """Context manager holding the lock of `train_dir` (created if needed).

    Raises (on entry):
      MtssError: the directory cannot be created or written (naming why: read-only,
        permission, disk full), or another live process holds the lock (naming it).
    """

    def __init__(self, train_dir: str):
        self.train_dir = train_dir
        self.path = os.path.join(train_dir, LOCK_FILE)
        self._fd: int | None = None

    def __enter__(self) -> "TrainDirLock":
        try:
            os.makedirs(self.train_dir, exist_ok=True)
        except OSError as e:
            raise MtssError(f"cannot create --train_dir {self.train_dir}: {e.strerror}") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MtssError(f"cannot write in --train_dir {self.train_dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A file system without locks (some network mounts): run, but say so.
                logging.warning("cannot lock %s (%s); make sure no other run uses this --train_dir",
                                self.path, e.strerror)
                self._fd = fd
                return self
            holder = self._holder(fd)
            os.close(fd)
            raise MtssError(
                f"--train_dir {self.train_dir} is in use by another training run ({holder}); wait for it "
                f"to end or stop it, or use another --train_dir"
            ) from None
        self._fd = fd
        self._write_holder(fd)
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        return text.replace("\n", ", ") or "its process is starting"

    def _write_holder(self, fd: int) -> None:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        text = (f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"
                f"command: {' '.join(sys.argv)}\n")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
            os.fsync(fd)
        except OSError as e:
            self.__exit__()
            raise MtssError(f"cannot write in --train_dir {self.train_dir}: {e.strerror}") from None

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # Closing releases the flock; the file stays for the next run.
            self._fd = None

"""What controls a run from outside it: the lock on its run directory, and stop signals.

RunLock: one run at a time per run directory. Two runs writing one run directory would interleave checkpoints and metrics. The main process of a run creates
`run_dir/.lock` (its host, pid and start time) before it writes anything and removes it when it ends; a second
run is refused while the holder lives. A lock whose holder is gone is taken over with a warning: on this host
when its pid no longer exists, from another host when the lock has not been refreshed for STALE_AFTER seconds
(the holder refreshes it whenever it logs).
"""

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
STALE_AFTER = 3600.0  # seconds without a refresh after which another host's lock counts as abandoned
REFRESH_EVERY = 60.0  # seconds between refreshes: far inside STALE_AFTER, and no file-system call per step


class RunDirLocked(RuntimeError):
    """Another live run holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._refreshed = time.monotonic()

    def acquire(self) -> None:
        """Take the lock, or raise RunDirLocked naming the live holder; the run dir must exist."""
        for _ in range(2):  # a second try after removing an abandoned lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(self.owner, file)
            return
        raise RunDirLocked(f"{self.path} was re-created by another run while this one started; try again")

    def refresh(self) -> None:
        """Mark the lock as alive (its modification time), for runs on other hosts that find it; called every
        logged step, it touches the file at most every REFRESH_EVERY seconds."""
        now = time.monotonic()
        if now - self._refreshed >= REFRESH_EVERY:
            os.utime(self.path)
            self._refreshed = now

    def release(self) -> None:
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # gone, or being written this moment (it is created empty, then filled)

    def _take_over_or_refuse(self) -> None:
        holder = self._holder()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if holder is None:
            if age < 60:  # an empty lock just created by a run starting now
                raise RunDirLocked(f"{self.path.parent} is being started by another run ({self.path} is new)")
            reason = "unreadable"
        elif holder["host"] == self.owner["host"] and holder["pid"] == self.owner["pid"]:
            reason = "an earlier run in this process that did not end"
        elif holder["host"] == self.owner["host"]:
            if _alive(holder["pid"]):
                raise RunDirLocked(
                    f"run dir {self.path.parent} is in use by another run (pid {holder['pid']} on this host, "
                    f"lock {self.path}); wait for it to end, stop it, or pick another --run_name"
                )
            reason = f"its process {holder['pid']} is gone"
        elif age < STALE_AFTER:
            raise RunDirLocked(
                f"run dir {self.path.parent} is in use by a run on host {holder['host']} (pid {holder['pid']}, "
                f"lock {self.path} refreshed {age:.0f} s ago); wait for it to end or pick another --run_name "
                f"(a lock not refreshed for {STALE_AFTER:.0f} s is taken over)"
            )
        else:
            reason = f"host {holder['host']} has not refreshed it for {age:.0f} s"
        logger.warning("taking over the lock %s left by an earlier run (%s)", self.path, reason)
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class StopSignals:
    """From construction to restore(), SIGTERM/SIGINT only record the signal, so that training stops cleanly at
    the next step boundary (train.py installs it first thing, so start-up is covered). A second signal gets the
    previous handler (the default: act at once)."""

    def __init__(self):
        self.received, self.handlers = 0, {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        self.handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for signum in self.handlers:
            signal.signal(signum, self._request_stop)

    def _request_stop(self, signum, frame):
        self.received = signum
        signal.signal(signum, self.handlers[signum])

    def restore(self) -> None:
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        self.handlers = {}

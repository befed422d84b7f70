"""One trainer per run directory: a lock file naming the host and process that holds it.

Two trainers writing checkpoints, metrics and `latest` into one `run_dir` corrupt each
other's run without an error (a second `--resume` started by mistake, a job submitted
twice). `RunDirLock(run_dir).acquire()` creates `<run_dir>/.lock` with O_CREAT|O_EXCL, so
of two processes racing for it exactly one succeeds, and writes into it who holds it:

    {"host": "node7", "pid": 4242, "started": "2026-01-31T12:00:00+00:00", ...}

A second process finds the file and is refused with one `L3TrainError` line naming that
host, pid and start time. A lock whose holder died without releasing it (SIGKILL, a node
crash) is taken over, with a warning, when that can be proven:

- the holder ran on this host and its pid no longer exists, or the pid now belongs to a
  process that started later (pids are reused, and in a container a restarted job can
  get the very same pid);
- the holder was an earlier run of this same SLURM job (same job id, lower restart count):
  SLURM runs one instance of a job at a time, and a requeued job may land on another node.

A holder on another host cannot be checked from here, so it is refused; the message says
to delete the lock file if that process is gone. In a distributed run only rank 0 takes
the lock. `release()` removes the file only while it still names this process.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from l3train.errors import L3TrainError
from l3train.process import process_is_running

LOCK_NAME = ".lock"
# A lock file is written right after it is created: a reader that finds it empty or
# half-written waits this long for the holder to finish writing before calling it unreadable.
_UNREADABLE_GRACE_S = 2.0


def _process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None where /proc cannot say.
    Told apart from the holder's recorded value, it shows that a pid was reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None  # field 22 of proc(5)


def _slurm_job() -> tuple[str | None, int]:
    """This process's SLURM job id (None outside SLURM) and restart count."""
    return os.environ.get("SLURM_JOB_ID") or None, int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class RunDirLock:
    """The lock of one run directory: `acquire()` / `release()`, or `with RunDirLock(run_dir):`."""

    def __init__(self, run_dir: str | os.PathLike, log: Callable[[str], None] = _warn_on_stderr,
                 holder_kind: str = "trainer") -> None:
        self.run_dir = Path(run_dir)
        self.holder_kind = holder_kind  # who takes such a lock, for the refusal: "trainer", "study"
        self.path = self.run_dir / LOCK_NAME
        self.log = log  # where the take-over warning goes (stderr by default)
        self._record: dict[str, Any] | None = None  # what this process wrote, while it holds the lock
        self._created_run_dir = False  # acquire() made run_dir: release() removes it if still empty

    @property
    def held(self) -> bool:
        return self._record is not None

    def _own_record(self) -> dict[str, Any]:
        job_id, restart = _slurm_job()
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "process_start_ticks": _process_start_ticks(os.getpid())}
        if job_id is not None:
            record.update(slurm_job_id=job_id, slurm_restart_count=restart)
        return record

    def acquire(self) -> str | None:
        """Take the lock, or raise `L3TrainError` naming the live holder.

        Returns the warning (also passed to `log`) when a dead holder's lock was taken
        over, else None. Acquiring a lock this object already holds is a no-op.
        """
        if self.held:
            return None
        self._created_run_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = self._own_record()
        warning = None
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, text = self._read_holder()
                if holder is None:
                    continue  # released meanwhile: try again
                why_stale = self._stale_reason(holder)
                if why_stale is None:
                    raise L3TrainError(self._refusal(holder)) from None
                # Remove the stale file only if it is still the one judged (another process
                # may have taken it over since); then race for the lock again.
                if self._read_text() == text:
                    self.path.unlink(missing_ok=True)
                    warning = (f"taking over stale lock of dead process {holder.get('pid')} on "
                               f"{holder.get('host')} ({why_stale}): {self.path}")
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            break
        self._record = record
        if warning:
            self.log(warning)
        return warning

    def release(self) -> None:
        """Remove the lock file if this object holds it and the file still names this process."""
        if not self.held:
            return
        try:
            holder = json.loads(self._read_text() or "null")
        except json.JSONDecodeError:
            holder = None
        if holder == self._record:
            self.path.unlink(missing_ok=True)
        self._record = None
        if self._created_run_dir and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # a run refused before writing anything leaves no trace

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _read_text(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _read_holder(self) -> tuple[dict[str, Any] | None, str | None]:
        """The holder's record and the file's text; (None, None) when the file is gone.
        An empty or partial file may be one being written right now: wait a little."""
        deadline = time.monotonic() + _UNREADABLE_GRACE_S
        while True:
            text = self._read_text()
            if text is None:
                return None, None
            try:
                holder = json.loads(text)
                # pid 0 or below would make os.kill signal a process group: not a holder.
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0:
                    return holder, text
            except json.JSONDecodeError:
                pass
            if time.monotonic() > deadline:
                raise L3TrainError(f"run_dir {self.run_dir} is locked by {self.path}, which is unreadable "
                                   f"({text[:60]!r}); delete it if no trainer is using {self.run_dir}")
            time.sleep(0.05)

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why `holder` is certainly gone, or None when it may still be running."""
        job_id, restart = _slurm_job()
        if job_id is not None and holder.get("slurm_job_id") == job_id \
                and int(holder.get("slurm_restart_count") or 0) < restart:
            return f"an earlier run of SLURM job {job_id}"
        if holder.get("host") != socket.gethostname():
            return None
        pid = holder["pid"]
        if not process_is_running(pid):
            return "no such process"
        recorded, current = holder.get("process_start_ticks"), _process_start_ticks(pid)
        if recorded is not None and current is not None and recorded != current:
            return "its pid now belongs to another process"
        return None

    def _refusal(self, holder: dict[str, Any]) -> str:
        return (f"another {self.holder_kind} (pid {holder.get('pid')} on host {holder.get('host')}, started "
                f"{holder.get('started', 'at an unknown time')}) is using run_dir {self.run_dir}; wait for it, "
                f"or delete {self.path} if that process is gone")

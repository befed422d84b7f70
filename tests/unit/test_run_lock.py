"""RunDirLock: one trainer per run directory, a dead holder's lock taken over, a live one refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from l3train import run_lock
from l3train.errors import L3TrainError
from l3train.run_lock import RunDirLock

# A second process that takes the lock, says so, and holds it until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from l3train.run_lock import RunDirLock
    RunDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/run."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process
    finally:
        process.kill()
        process.wait()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": dead_pid(), "started": "2026-01-01T00:00:00+00:00", **fields}
    (run_dir / ".lock").write_text(json.dumps(record) + "\n")


def test_acquire_writes_who_holds_it_and_release_removes_it(tmp_path):
    lock = RunDirLock(tmp_path / "run")
    assert lock.acquire() is None
    record = json.loads((tmp_path / "run" / ".lock").read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid() and record["started"]
    assert lock.acquire() is None  # held already: a no-op
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()
    lock.release()  # releasing twice is harmless
    with RunDirLock(tmp_path / "run") as again:
        assert again.held and (tmp_path / "run" / ".lock").exists()
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_live_trainer_in_another_process_is_refused(tmp_path, holder):
    before = (tmp_path / "run" / ".lock").read_text()
    with pytest.raises(L3TrainError) as refused:
        RunDirLock(tmp_path / "run").acquire()
    message = str(refused.value)
    assert f"another trainer (pid {holder.pid} on host {socket.gethostname()}, started " in message
    assert f"is using run_dir {tmp_path / 'run'}; wait for it, or delete {tmp_path / 'run' / '.lock'}" in message
    assert "\n" not in message
    assert (tmp_path / "run" / ".lock").read_text() == before  # the holder's lock is left alone

    # Killed without releasing (SIGKILL): its lock is stale and is taken over.
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    warnings = []
    lock = RunDirLock(tmp_path / "run", log=warnings.append)
    warning = lock.acquire()
    assert warning == warnings[0]
    assert warning.startswith(f"taking over stale lock of dead process {holder.pid} on {socket.gethostname()}")
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, capsys):
    write_lock(tmp_path / "run")
    pid = json.loads((tmp_path / "run" / ".lock").read_text())["pid"]
    lock = RunDirLock(tmp_path / "run")  # default log: one warning line on stderr
    assert f"dead process {pid} on {socket.gethostname()} (no such process)" in lock.acquire()
    assert capsys.readouterr().err.startswith(f"warning: taking over stale lock of dead process {pid}")
    lock.release()


def test_a_zombie_holder_is_dead(tmp_path):
    """A killed trainer its launcher has not reaped yet (a zombie) holds nothing."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while not open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].startswith(" Z"):
            assert time.time() < deadline, "the child did not exit"
            time.sleep(0.05)
        write_lock(tmp_path / "run", pid=process.pid)
        warning = RunDirLock(tmp_path / "run", log=lambda _: None).acquire()
        assert warning and f"dead process {process.pid}" in warning
    finally:
        process.wait()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    # In a container a restarted trainer can get the dead one's pid: here, this process's.
    write_lock(tmp_path / "run", pid=os.getpid(), process_start_ticks=1)
    warning = RunDirLock(tmp_path / "run", log=lambda _: None).acquire()
    assert warning and "its pid now belongs to another process" in warning


def test_a_holder_on_another_host_is_refused(tmp_path):
    write_lock(tmp_path / "run", host="elsewhere-node", pid=1234)
    with pytest.raises(L3TrainError, match="pid 1234 on host elsewhere-node, started 2026-01-01"):
        RunDirLock(tmp_path / "run").acquire()


def test_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job may start on another node: its own earlier run's lock is stale."""
    write_lock(tmp_path / "run", host="elsewhere-node", pid=1234, slurm_job_id="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(L3TrainError, match="another trainer"):  # same run of the job: not provably gone
        RunDirLock(tmp_path / "run").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunDirLock(tmp_path / "run", log=lambda _: None)
    assert "an earlier run of SLURM job 77" in lock.acquire()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["slurm_restart_count"] == 1


def test_release_leaves_a_lock_that_another_process_took_over(tmp_path):
    lock = RunDirLock(tmp_path / "run")
    lock.acquire()
    write_lock(tmp_path / "run", pid=1)  # as if another trainer had judged this one dead
    lock.release()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == 1


def test_an_unreadable_lock_is_refused_after_a_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "_UNREADABLE_GRACE_S", 0.1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("")
    with pytest.raises(L3TrainError, match=r"is unreadable \(''\); delete it if no trainer is using"):
        RunDirLock(tmp_path / "run").acquire()


def test_of_processes_racing_for_the_lock_exactly_one_wins(tmp_path):
    race = textwrap.dedent("""
        import sys, time
        from l3train.errors import L3TrainError
        from l3train.run_lock import RunDirLock
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
        try:
            RunDirLock(sys.argv[1]).acquire()
            print("won", flush=True)
            time.sleep(3)  # hold it while the others try
        except L3TrainError:
            print("refused", flush=True)
    """)
    start = str(time.time() + 2)
    racers = [subprocess.Popen([sys.executable, "-c", race, str(tmp_path / "run"), start], stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
    outcomes = sorted(process.communicate(timeout=60)[0].strip() for process in racers)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_a_study_never_discards_a_run_that_a_trainer_holds(tmp_path, holder):
    """tools/study.py removes a run stopped before its first checkpoint, but not while its trainer runs."""
    from l3train.study import discard_unstarted_run

    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(L3TrainError, match=rf"another trainer \(pid {holder.pid} on host"):
        discard_unstarted_run(tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    holder.kill()
    holder.wait()
    discard_unstarted_run(tmp_path / "run")  # its trainer is gone: the unstarted run goes
    assert not (tmp_path / "run").exists()

"""Run the real trainer in subprocesses (plain python or torchrun over gloo) and read its outputs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import psutil
import yaml

from l3train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def trainer_env() -> dict[str, str]:
    """The environment of trainer and worker subprocesses: CPU (GPUs hidden: the trainer then
    chooses the CPU itself), one thread per rank, and tests/ on the path, so that a test
    module run as a worker script imports this harness."""
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]),
               TORCH_EXTENSIONS_DIR=os.environ.get(
                   "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/l3train/torch_extensions")))
    return env


def trainer_command(config: Path, *args: str, nproc: int = 0) -> list[str]:
    """`python -m l3train.train` (nproc=0) or torchrun with `nproc` gloo ranks."""
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    else:
        launcher = [sys.executable]
    return [*launcher, "-m", "l3train.train", "--config", str(config), *args]


def run_trainer(config: Path, *args: str, nproc: int = 0, check: bool = True,
                timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m l3train.train` (nproc=0) or torchrun with `nproc` gloo ranks."""
    cmd = trainer_command(config, *args, nproc=nproc)
    result = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}): {' '.join(cmd)}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


def run_expecting_error(*args: str) -> str:
    """Run the trainer expecting a user error: exit status 2 and exactly one stderr line (returned)."""
    result = subprocess.run([sys.executable, "-m", "l3train.train", *args], cwd=REPO, env=trainer_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def stop_and_resume(config: Path, run_dir: Path, overrides: list[str], stop_after: int, nproc: int) -> None:
    """Train with `--exit-after-steps stop_after`, then `--resume` to the end, in `run_dir`."""
    common = [f"run_dir={run_dir}", *overrides]
    run_trainer(config, *common, "--exit-after-steps", str(stop_after), nproc=nproc)
    second = run_trainer(config, *common, "--resume", nproc=nproc)
    assert f"resuming at step {stop_after}" in second.stdout


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Block until the run's metrics.jsonl has a line for `step` (log_interval=1)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL `process` and all its descendants at once (torchrun starts each rank in a
    session of its own, so killing the launcher's process group would spare them)."""
    try:
        root = psutil.Process(process.pid)
        victims = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:  # already gone
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    process.wait()
    # The ranks are not the launcher's children once it is dead: wait until they are gone too,
    # or a --resume started at once finds the killed rank 0 still holding the run's lock.
    psutil.wait_procs(victims, timeout=30)



@dataclass
class RankOneStopped:
    """What a two-rank run did after rank 1 was stopped (`stop_rank_one`)."""

    returncode: int
    seconds: float  # from the stop to the launcher's end
    survivors: list  # processes of the run still alive (never zombies) when the launcher ended
    output: str  # the launcher's and the ranks' stdout and stderr


def stop_rank_one(config: Path, tmp_path: Path, stop: str, *overrides: str, wait: float = 150) -> RankOneStopped:
    """Train `config` on two ranks to step 3, then `stop` rank 1 ("kill": SIGKILL, a rank that
    dies; "suspend": SIGSTOP, a rank that hangs) and wait for the launcher to end."""
    run_dir = tmp_path / "run"
    cmd = trainer_command(config, f"run_dir={run_dir}", "training.steps=100000", "checkpoint.save_interval=100000",
                          "training.eval_interval=100000", "training.log_interval=1", *overrides, nproc=2)
    log = (tmp_path / "out.log").open("w+")
    launcher = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(run_dir, 3, launcher)
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "RANK" in p.environ()}
        stopped_at = time.time()
        getattr(ranks[1], stop)()
        launcher.wait(timeout=wait)
        seconds = time.time() - stopped_at
        survivors = [p for p in ranks.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        kill_tree(launcher)
    log.seek(0)
    return RankOneStopped(launcher.returncode, seconds, survivors, log.read())

def assert_crash_resume_is_exact(config: Path, whole_run: Path, run_dir: Path, overrides: list[str]) -> None:
    """With checkpoints every 5 of 20 steps: SIGKILL every process after a random step past the
    first checkpoint, `--resume`, and compare all per-step losses with `whole_run` bit for bit."""
    kill_at = random.Random().randint(6, 18)
    resumed_at = crash_and_resume(config, run_dir, [*overrides, "checkpoint.save_interval=5"], 2, kill_at)
    assert 5 <= resumed_at <= kill_at, (resumed_at, kill_at)
    assert metrics(run_dir, "train/loss") == metrics(whole_run, "train/loss"), f"killed after step {kill_at}"


def crash_and_resume(config: Path, run_dir: Path, overrides: list[str], nproc: int, kill_at: int) -> int:
    """Train until step `kill_at` is logged, SIGKILL the launcher and every rank at once (a node
    failure), then `--resume` to the end; returns the step the resume started from."""
    common = [f"run_dir={run_dir}", "training.log_interval=1", *overrides]
    process = subprocess.Popen(trainer_command(config, *common, nproc=nproc), cwd=REPO, env=trainer_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, kill_at, process)
    finally:
        kill_tree(process)
    resumed = run_trainer(config, *common, "--resume", nproc=nproc)
    return int(resumed.stdout.split("resuming at step ")[1].split()[0].rstrip(";"))


def finish_worker(status: int = 0) -> NoReturn:
    """Leave a torchrun worker: a barrier (every rank is past its last collective), then exit
    without interpreter finalization, which can abort a gloo process at exit
    (l3train.process.exit_process explains the race)."""
    import torch.distributed as dist

    from l3train.process import exit_process

    if dist.is_initialized():
        dist.barrier()
    exit_process(status)


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def tiny_l3_config(run_dir: Path, corpus, allocation: Path) -> dict:
    """A tiny L³ model on the test corpus: trains a step in well under a second."""
    return {
        "run_dir": str(run_dir),
        "model": {"vocab_size": corpus.vocab_size, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden_size": 128, "max_seq_len": 64},
        "l3": {"after_blocks": [0], "d_emb": 64, "d_up": 128, "tied_kv": True, "allocation": str(allocation)},
        "data": {"prefixes": [corpus.data_prefix], "split": "90,10,0", "seq_length": 64,
                 "tokenizer": str(corpus.tokenizer_path)},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 1.0},
        "training": {"steps": 12, "micro_batch_size": 4, "global_batch_size": 8, "seed": 7,
                     "eval_interval": 6, "eval_batches": 2, "log_interval": 1},
        "parallel": {"zero_stage": 0},
        "checkpoint": {"save_interval": 6, "keep_last": 2},
    }


def metrics(run_dir: Path, name: str) -> dict[int, float]:
    """{step: value} of one scalar from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[name] for row in rows if name in row}


def assert_losses_close(actual: dict[int, float], expected: dict[int, float], rtol: float) -> None:
    assert sorted(actual) == sorted(expected)
    got = np.array([actual[s] for s in sorted(actual)])
    want = np.array([expected[s] for s in sorted(expected)])
    worst = float(np.max(np.abs(got - want) / np.abs(want)))
    assert worst <= rtol, f"max relative loss difference {worst:.3g} > {rtol}: {got} vs {want}"

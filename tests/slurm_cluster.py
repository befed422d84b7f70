"""The session's two-node SLURM cluster (launch/slurm/cluster.sh), as tests/conftest.py's
`slurm_cluster` fixture starts it: one cluster for every SLURM test and the README test.

launch/slurm/cluster.sh starts munged, slurmctld and slurmd for nodes n1 and n2 on this
machine; jobs are submitted with the real sbatch. Job state is polled with `scontrol show
job` (sbatch --wait adds ~30 s per job).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from training_harness import REPO, trainer_env

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def slurm_unavailable() -> str:
    """'' when the local SLURM cluster can run here, else why not."""
    if shutil.which("slurmctld") is None and not Path("/usr/sbin/slurmctld").exists():
        return "slurm-wlm is not installed (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "launch/slurm/cluster.sh needs root (slurmd)"
    return ""


@dataclass(frozen=True)
class Cluster:
    conf: Path

    @property
    def directory(self) -> Path:
        return self.conf.parent

    def env(self, **extra: str) -> dict[str, str]:
        return {**trainer_env(), "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, **extra_env: str) -> str:
        result = subprocess.run(cmd, cwd=REPO, env=self.env(**extra_env), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{' '.join(cmd)} failed: {result.stderr}{result.stdout}"
        return result.stdout

    def sbatch(self, *args: str, **extra_env: str) -> str:
        return self.run("sbatch", "--parsable", *args, **extra_env).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record (JobState, Restarts, ...) from `scontrol show job`."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", job_id)))

    def wait(self, job_id: str, log: Path, timeout: float = 180) -> dict[str, str]:
        deadline = time.time() + timeout
        while (record := self.job(job_id))["JobState"] not in FINAL_STATES:
            if time.time() > deadline:
                subprocess.run(["scancel", job_id], env=self.env(), timeout=30)
                pytest.fail(f"job {job_id} still {record['JobState']} after {timeout} s; log:\n{tail(log)}")
            time.sleep(1)
        return record

    def live_pids(self) -> list[int]:
        pids = [int(line.split()[1]) for line in (self.directory / "pids").read_text().splitlines()]
        return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else f"({log} not written)"

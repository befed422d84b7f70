#!/usr/bin/env python
"""Submit a study: every point of a config × override grid as one SLURM job.

A study (a learning-rate sweep, dense vs L³ at several sizes, ...) should be one command
and leave one record. Each grid point becomes
`sbatch ... launch/slurm/pretrain.sbatch CONFIG overrides... run_dir=STUDY/NAME`, with its
own run directory under the study directory, and STUDY/study.json lists the runs (name,
config, overrides, run dir, job id, log) for tools/report.py and for humans. Every run's
config is loaded and validated before anything is submitted, so a typo in the grid fails
here and not in N queued jobs.

Sweep file (YAML):

    configs: [configs/tiny_l3.yaml]            # base config(s), crossed with the grid
    grid:                                      # key.sub: list of values (cartesian product)
      optimizer.lr: [1.0e-3, 3.0e-3]
    overrides: [training.steps=1000]           # optional, applied to every run
    sbatch_args: [--nodes=2, --time=04:00:00]  # optional, passed to every sbatch
    study_dir: runs/studies/lr                 # optional (--study-dir wins;
                                               # default runs/studies/<sweep file name>)

Paths in the sweep file are relative to the current directory. Jobs are submitted from
the repository root (the batch script runs there); their logs go to STUDY/logs/.

    python launch/sweep.py sweeps/lr.yaml --dry-run    # print the sbatch lines only
    python launch/sweep.py sweeps/lr.yaml              # submit, write STUDY/study.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from l3train.config import load_config
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.utils.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
BATCH_SCRIPT = "launch/slurm/pretrain.sbatch"
SWEEP_KEYS = ("configs", "grid", "overrides", "sbatch_args", "study_dir")
MANIFEST = "study.json"


@dataclass
class Job:
    name: str
    config: str  # absolute path
    overrides: list[str]  # including run_dir=..., last
    run_dir: str  # absolute path
    log: str  # sbatch --output pattern (%j: job id)
    sbatch: list[str]  # the command line
    job_id: str | None = None


def yaml_text(value: Any) -> str:
    """`value` as override text that the trainer's YAML parsing reads back as `value`."""
    if isinstance(value, list):
        text = "[" + ", ".join(yaml_text(item) for item in value) + "]"
    elif isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if exponent and "." not in mantissa:  # PyYAML reads 1e-05 as a string, 1.0e-05 as a float
            text = f"{mantissa}.0e{exponent}"
    else:
        text = json.dumps(value)  # JSON scalars are YAML
    if yaml.safe_load(text) != value:
        raise L3TrainError(f"cannot pass {value!r} as a config override value")
    return text


def load_sweep(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise L3TrainError(f"sweep file {path} not found")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise L3TrainError(f"sweep file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(sweep, dict):
        raise L3TrainError(f"sweep file {path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise L3TrainError(f"sweep file {path}: unknown key {unknown[0]!r}; valid keys are {', '.join(SWEEP_KEYS)}")
    configs = sweep.get("configs")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise L3TrainError(f"sweep file {path}: 'configs' must be a non-empty list of config paths")
    grid = sweep.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise L3TrainError(f"sweep file {path}: 'grid' must map key.sub to a non-empty list of values")
    if "run_dir" in grid:
        raise L3TrainError(f"sweep file {path}: run_dir is set per run by the sweep; remove it from 'grid'")
    for key in ("overrides", "sbatch_args"):
        items = sweep.get(key) or []
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise L3TrainError(f"sweep file {path}: '{key}' must be a list of strings")
    if any(item.split("=", 1)[0].strip() == "run_dir" for item in sweep.get("overrides") or []):
        raise L3TrainError(f"sweep file {path}: run_dir is set per run by the sweep; remove it from 'overrides'")
    return sweep


def run_name(config: Path, point: dict[str, Any]) -> str:
    parts = [config.stem] + [f"{key.rsplit('.', 1)[-1]}{yaml_text(value)}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", "-".join(parts)).strip("_")


def expand(sweep: dict[str, Any], study_dir: Path) -> list[Job]:
    """One Job per (config, grid point), each config validated with its overrides."""
    grid: dict[str, list] = sweep.get("grid") or {}
    fixed: list[str] = sweep.get("overrides") or []
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    planned = [(Path(config).resolve(), point) for config in sweep["configs"] for point in points]
    names = [run_name(config, point) for config, point in planned]
    if len(set(names)) < len(names):
        names = [f"{index:03d}-{name}" for index, name in enumerate(names)]
    jobs = []
    for name, (config, point) in zip(names, planned):
        run_dir = study_dir / name
        overrides = [*fixed, *(f"{key}={yaml_text(value)}" for key, value in point.items()), f"run_dir={run_dir}"]
        try:
            load_config(config, overrides)
        except L3TrainError as err:
            raise L3TrainError(f"run {name} ({config.name} {' '.join(overrides[:-1])}): {err}") from None
        log = str(study_dir / "logs" / f"{name}-%j.out")
        command = ["sbatch", "--parsable", f"--job-name={name}", f"--output={log}",
                   *(sweep.get("sbatch_args") or []), BATCH_SCRIPT, str(config), *overrides]
        jobs.append(Job(name, str(config), overrides, str(run_dir), log, command))
    return jobs


def write_manifest(study_dir: Path, sweep_file: Path, jobs: list[Job]) -> None:
    manifest = {"sweep_file": str(sweep_file.resolve()), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "submit_dir": str(REPO), "runs": [asdict(job) for job in jobs]}
    atomic_write_text(study_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def submit(jobs: list[Job], study_dir: Path, sweep_file: Path) -> None:
    """sbatch each job from the repository root; study.json is rewritten after each one,
    so it lists exactly the submitted jobs even if a later submission fails."""
    (study_dir / "logs").mkdir(parents=True, exist_ok=True)
    submitted: list[Job] = []
    for job in jobs:
        try:
            result = subprocess.run(job.sbatch, cwd=REPO, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise L3TrainError("sbatch not found: run this on a SLURM login node (or use --dry-run)") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise L3TrainError(f"sbatch failed for {job.name} ({len(submitted)} of {len(jobs)} submitted, listed "
                               f"in {study_dir / MANIFEST}): {detail[-1] if detail else 'no output'}")
        job.job_id = result.stdout.strip().split(";")[0]
        submitted.append(job)
        write_manifest(study_dir, sweep_file, submitted)
        print(f"submitted {job.name}: job {job.job_id}, run dir {job.run_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = CliArgumentParser(prog="launch/sweep.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="sweep file (YAML, see above)")
    parser.add_argument("--study-dir", type=Path, help="where the run directories and study.json go")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch lines; submit and write nothing")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    study_dir = (args.study_dir or Path(sweep.get("study_dir") or f"runs/studies/{args.sweep.stem}")).resolve()
    jobs = expand(sweep, study_dir)
    if args.dry_run:
        print(f"# dry run: {len(jobs)} job(s), nothing submitted; run from {REPO}", file=sys.stderr)
        for job in jobs:
            print(shlex.join(job.sbatch))
        return 0
    if (study_dir / MANIFEST).exists():
        raise L3TrainError(f"{study_dir / MANIFEST} exists: that study was already submitted; pick another --study-dir")
    submit(jobs, study_dir, args.sweep)
    print(f"study {study_dir}: {len(jobs)} job(s); manifest {study_dir / MANIFEST}")
    return 0


if __name__ == "__main__":
    run_cli(main)

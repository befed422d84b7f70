"""Launchers without a cluster: sweep.py's dry run and input errors, local.sh training on
2 gloo ranks (and resuming) and repeating a trainer's one-line error last, and the batch
script's refusal to run outside SLURM.
The SLURM submissions themselves are in test_slurm.py."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml
from training_harness import REPO, metrics, tiny_l3_config, trainer_env, write_config


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def one_line_error(*cmd: str) -> str:
    result = run(*cmd, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_sweep_dry_run_prints_the_sbatch_lines(tmp_path):
    dense = tmp_path / "dense.yaml"
    dense.write_text((REPO / "configs" / "tiny_l3.yaml").read_text().replace("after_blocks: [1, 2]", "after_blocks: []"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "configs": ["configs/tiny_l3.yaml", str(dense)],
        "grid": {"optimizer.lr": [1.0e-3, 3.0e-5], "l3.d_up": [256]},
        "overrides": ["training.steps=50", "optimizer.min_lr=1.0e-6"],
        "sbatch_args": ["--nodes=2", "--time=00:10:00"],
    }, sort_keys=False))
    study = tmp_path / "study"
    result = run(sys.executable, "launch/sweep.py", str(sweep), "--study-dir", str(study), "--dry-run")
    expected = []
    for config in (REPO / "configs" / "tiny_l3.yaml", dense):
        for lr in ("0.001", "3.0e-05"):
            name = f"{config.stem}-lr{lr}-d_up256"
            expected.append(
                f"sbatch --parsable --job-name={name} --output={study}/logs/{name}-%j.out --nodes=2 --time=00:10:00 "
                f"launch/slurm/pretrain.sbatch {config} training.steps=50 optimizer.min_lr=1.0e-6 optimizer.lr={lr} l3.d_up=256 "
                f"run_dir={study}/{name}")
    assert result.stdout.splitlines() == expected
    assert "dry run: 4 job(s), nothing submitted" in result.stderr
    assert not study.exists()
    # The printed values parse back to the grid's values, as the trainer will read them.
    assert [yaml.safe_load(shlex.split(line)[-3].split("=", 1)[1]) for line in expected] == [1e-3, 3e-5] * 2


def test_sweep_rejects_bad_input_before_submitting(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"configs": ["configs/tiny_l3.yaml"], "grid": {"model.d_modle": [64]}}))
    assert "model.d_modle: unknown key" in one_line_error(sys.executable, "launch/sweep.py", str(sweep), "--dry-run")
    sweep.write_text(yaml.safe_dump({"configs": ["configs/tiny_l3.yaml"], "grid": {"run_dir": ["x"]}}))
    assert "run_dir is set per run" in one_line_error(sys.executable, "launch/sweep.py", str(sweep), "--dry-run")
    sweep.write_text(yaml.safe_dump({"config": ["configs/tiny_l3.yaml"]}))
    assert "unknown key 'config'" in one_line_error(sys.executable, "launch/sweep.py", str(sweep), "--dry-run")
    assert "not found" in one_line_error(sys.executable, "launch/sweep.py", str(tmp_path / "none.yaml"))
    assert "Submit a study" in run(sys.executable, "launch/sweep.py", "--help").stdout


def test_scripts_explain_usage():
    assert "usage: launch/local.sh NPROC CONFIG" in run("bash", "launch/local.sh", "--help").stdout
    assert "NPROC must be a positive integer" in one_line_error("bash", "launch/local.sh", "0", "configs/tiny_l3.yaml")
    assert "config file nope.yaml not found" in one_line_error("bash", "launch/local.sh", "2", "nope.yaml")
    assert "usage: launch/slurm/cluster.sh start" in run("bash", "launch/slurm/cluster.sh", "--help").stdout
    assert "sbatch [--nodes N]" in run("bash", "launch/slurm/pretrain.sbatch", "--help").stdout
    outside = run("bash", "launch/slurm/pretrain.sbatch", "configs/tiny_l3.yaml", check=False)
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


@pytest.mark.slow
def test_local_sh_trains_on_two_processes_and_resumes(tmp_path, tiny_corpus, tiny_allocation):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_l3_config(run_dir, tiny_corpus, tiny_allocation))
    first = run("bash", "launch/local.sh", "2", str(config), "--exit-after-steps", "6")
    assert "[local.sh] 2 process(es), cpu, OMP_NUM_THREADS=" in first.stdout
    assert "[l3train] 2 rank(s)" in first.stdout and "exiting after 6 steps" in first.stdout
    second = run("bash", "launch/local.sh", "2", str(config), "--resume")
    assert "resuming at step 6" in second.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert sorted(metrics(run_dir, "train/loss")) == list(range(1, 13))


@pytest.mark.slow
def test_local_sh_repeats_the_trainers_error_last(tmp_path, tiny_corpus, tiny_allocation):
    """An unknown key is refused by every rank (each parses the config) under torchrun, whose
    failure report then buries the trainer's one-line error: local.sh prints it again last,
    once, and exits 2 like the trainer (torchrun itself exits 1)."""
    config = write_config(tmp_path / "config.yaml", tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation))
    result = run("bash", "launch/local.sh", "2", str(config), "training.bogus=1", check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-4000:]
    assert lines[-1].startswith("error: training.bogus: unknown key"), result.stderr[-4000:]
    report = lines.index(next(line for line in lines if "ChildFailedError" in line))  # torchrun's report ...
    assert lines[report:].count(lines[-1]) == 1  # ... then the error line, once
    assert 2 <= lines.count(lines[-1]) <= 3  # printed by a rank or two, and again last

"""tools/report.py on real tiny runs (L³, dense, L³+MoE): the table's figures match the
accounting and the metrics, the plots are real PNGs, and bad inputs are one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_harness import REPO, metrics, trainer_env

from l3train.allocation.allocation import Allocation
from l3train.config import load_config
from l3train.sizing.accounting import model_stats

SUFFIXES = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


@pytest.fixture(scope="module")
def runs(shared_runs, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The session's tiny L³, dense and L³+MoE runs, linked under the names the report shows."""
    root = tmp_path_factory.mktemp("report_runs")
    for name, base in (("l3", "tiny_l3"), ("dense", "tiny_dense"), ("l3_moe", "tiny_l3_moe")):
        (root / name).symlink_to(shared_runs.get(base).run_dir, target_is_directory=True)
    return root / "l3", root / "dense", root / "l3_moe"


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/report.py", *args], cwd=REPO, env=trainer_env(),
                          capture_output=True, text=True, timeout=300)


def parse_count(text: str) -> float:
    number, suffix = re.fullmatch(r"([\d.]+)([KMBT]?)", text).groups()
    return float(number) * SUFFIXES[suffix]


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_report_table_and_plots(runs, tmp_path):
    l3_dir, dense_dir, l3_moe_dir = runs
    out = tmp_path / "report"
    result = report(str(l3_dir), str(dense_dir), str(l3_moe_dir), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "report of 3 run(s)" in result.stdout
    rows = table_rows((out / "report.md").read_text())
    assert set(rows) == {"l3", "dense", "l3_moe"}
    allocation = Allocation.load(load_config(l3_dir / "config.yaml").l3.allocation)
    for name, run_dir, family in (("l3", l3_dir, "L³"), ("dense", dense_dir, "dense"),
                                  ("l3_moe", l3_moe_dir, "L³+MoE")):
        row = rows[name]
        cfg = load_config(run_dir / "config.yaml")
        rows_v, mean_rows = ((int(allocation.rows_per_token.sum()), allocation.mean_rows_per_token_occurrence())
                             if cfg.l3.after_blocks else (0, 0.0))
        stats = model_stats(cfg.model, cfg.l3, cfg.data.seq_length, rows_v, mean_rows, cfg.moe)
        assert row["family"] == family
        for column, expected in (("total params", stats.total_params), ("active params", stats.active_params),
                                 ("FLOPs/token (fwd)", stats.flops_per_token), ("tokens seen", 12 * 8 * 64)):
            assert parse_count(row[column]) == pytest.approx(expected, rel=1e-3), (name, column, row[column])
        train, val = metrics(run_dir, "train/loss"), metrics(run_dir, "val/loss")
        assert row["final train loss"] == f"{train[12]:.4f}"
        assert row["final val loss"] == f"{val[12]:.4f}"
        assert row["best val loss"] == f"{min(val.values()):.4f}"
    # L³ adds table rows that a token mostly does not touch: more total than active parameters.
    assert parse_count(rows["l3"]["total params"]) > parse_count(rows["l3"]["active params"])
    assert rows["dense"]["total params"] == rows["dense"]["active params"]

    for png in ("loss_vs_tokens.png", "val_loss_vs_active_params.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 400
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50, f"{png} looks empty"  # lines, text, markers
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_study_manifest_skips_runs_without_steps(runs, tmp_path):
    l3_dir, dense_dir, _ = runs
    study = tmp_path / "study"
    study.mkdir()
    pending = study / "pending"  # queued but not started: no run directory yet
    (study / "study.json").write_text(json.dumps({"runs": [
        {"name": "a", "run_dir": str(l3_dir)}, {"name": "b", "run_dir": str(dense_dir)},
        {"name": "c", "run_dir": str(pending)}]}))
    result = report(str(study), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"warning: skipping c of study {study}: run directory {pending} not found" in result.stderr
    assert set(table_rows((tmp_path / "out" / "report.md").read_text())) == {"a", "b"}



def test_a_tools_study_directory_is_reported_from_its_runs_folder(runs, tmp_path):
    """tools/study.py keeps its plan in plan.json and its runs under runs/ (launch/sweep.py lists
    its runs in study.json): one report reads both."""
    l3_dir, dense_dir, _ = runs
    study = tmp_path / "study"
    (study / "runs").mkdir(parents=True)
    (study / "plan.json").write_text(json.dumps({"steps": 12, "seeds": 1}))
    (study / "runs" / "l3_lzw-seed0").symlink_to(l3_dir)
    (study / "runs" / "dense-seed0").symlink_to(dense_dir)
    result = report(str(study), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert set(table_rows((tmp_path / "out" / "report.md").read_text())) == {"l3_lzw-seed0", "dense-seed0"}

def test_missing_or_empty_runs_are_one_line_errors(runs, tmp_path):
    l3_dir, _, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((l3_dir / "config.yaml").read_text())
    (empty / "metrics.jsonl").write_text("")
    for args, message in (([str(tmp_path / "missing")], f"run directory {tmp_path / 'missing'} not found"),
                          ([str(empty)], f"run {empty} has not logged a training step yet"),
                          ([str(tmp_path)], "has no config.yaml"),
                          ([], "the following arguments are required")):
        result = report(*args, "--output", str(tmp_path / "out"))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()

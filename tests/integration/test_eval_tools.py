"""tools/evaluate.py and tools/study.py on real runs of the tiny corpus: a training checkpoint
and its consolidation evaluate alike, the diagnostics write their plots and TensorBoard
scalars, the held-out documents are the trainer's validation documents, and the study runs
end to end, skips what is done on a rerun and refuses a changed plan."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from training_harness import REPO, tiny_l3_config, trainer_env, write_config

from l3train.data.tokenizer import Tokenizer
from l3train.eval.data import indexed_documents, split_range


def tool(script: str, *args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{script}", *map(str, args)], cwd=REPO, env=trainer_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(shared_runs) -> Path:
    return shared_runs.get("tiny_l3").run_dir


@pytest.mark.slow
def test_checkpoint_layouts_evaluate_alike_and_diagnostics_are_written(trained_run, tmp_path, tiny_corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tool("evaluate.py", "lm", trained_run, "--json", tmp_path / "training.json", "--quiet")
    assert result.returncode == 0, result.stderr
    training = json.loads((tmp_path / "training.json").read_text())
    assert training["step"] == 12 and "valid part of split 90,10,0" in training["text"]
    convert = tool("convert_checkpoint.py", "consolidate", trained_run, "--output", tmp_path / "consolidated")
    assert convert.returncode == 0, convert.stderr
    result = tool("evaluate.py", "lm", tmp_path / "consolidated", "--json", tmp_path / "consolidated.json", "--quiet")
    assert result.returncode == 0, result.stderr
    consolidated = json.loads((tmp_path / "consolidated.json").read_text())
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents"):
        assert consolidated[key] == training[key], key
    # The held-out documents are the validation part of the data; every token of them is scored.
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    held_out = indexed_documents(tiny_corpus.data_prefix, tokenizer, "90,10,0", "valid")
    assert training["tokens"] == held_out.num_tokens and training["documents"] == len(held_out.documents)

    out = tmp_path / "diagnostics"
    result = tool("evaluate.py", "diagnostics", trained_run, "--output", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "L³ after block 0: entropy" in result.stdout
    record = json.loads((out / "diagnostics.json").read_text())
    assert record["lm"]["loss"] == training["loss"]  # the same forward passes, with hooks attached
    layer = record["l3"]["0"]
    assert 0 < layer["entropy_mean"] <= math.log(max(row[0] for row in layer["entropy_by_rows"])) + 1e-9
    assert 0 < layer["top1_mean"] <= 1 and 0 < layer["rows_used_fraction_mean"] <= 1
    assert [point["name"] for point in record["logit_lens"]] == ["block 0", "L³ after block 0", "block 1"]
    for name in ("l3_histograms.png", "entropy_vs_rows.png", "logit_lens.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"eval/loss", "eval/bits_per_byte", "l3_diag/block_0/entropy_mean", "l3_diag/block_0/top1_mean",
            "l3_diag/block_0/rows_used_fraction_mean", "logit_lens/01_L³_after_block_0"} <= set(scalars)
    assert events.Scalars("eval/loss")[0].step == 12
    assert events.Scalars("eval/loss")[0].value == pytest.approx(training["loss"], rel=1e-6)
    assert {"l3_diag/block_0/entropy", "l3_diag/block_0/top1"} <= set(events.Tags()["histograms"])

    # The shipped task's code-like choices tokenize long with the tiny tokenizer: those that
    # alone exceed the tiny model's 64 positions are skipped and counted.
    result = tool("evaluate.py", "mc", trained_run, "--task", "configs/tasks/stdlib_continuation_example.jsonl",
                  "--json", tmp_path / "mc.json", "--quiet")
    assert result.returncode == 0, result.stderr
    mc = json.loads((tmp_path / "mc.json").read_text())
    assert mc["examples"] + mc["skipped"] == 8 and mc["examples"] >= 4
    assert mc["chance"] == 0.25 and 0 <= mc["accuracy"] <= 1
    # Raw JSONL text: the corpus's first documents.
    result = tool("evaluate.py", "lm", trained_run, "--text", tiny_corpus.jsonl_path, "--max-tokens", "3000",
                  "--quiet")
    assert result.returncode == 0, result.stderr
    assert "bits per byte" in result.stdout


def test_held_out_documents_are_the_trainers_validation_documents(tiny_corpus):
    from l3train.data.dataset import build_datasets
    from l3train.data.indexed import IndexedDocuments

    class Data:
        prefixes, weights, split, seq_length, tokenizer = ([tiny_corpus.data_prefix], None, "90,10,0", 64,
                                                           str(tiny_corpus.tokenizer_path))

    _, valid = build_datasets(Data, seed=5, valid_samples=8)
    begin, end = split_range(IndexedDocuments(tiny_corpus.data_prefix).num_documents, "90,10,0", "valid")
    assert list(valid.indices) == list(range(begin, end))


@pytest.mark.slow  # five tool start-ups: over 20 s on a busy machine
def test_bad_inputs_are_one_line_errors(tmp_path):
    missing = tmp_path / "missing"
    assert f"checkpoint {missing} not found" in one_error_line(tool("evaluate.py", "lm", missing))
    (tmp_path / "taken.json").write_text("{}")
    assert "already exists" in one_error_line(tool("evaluate.py", "lm", tmp_path, "--json", tmp_path / "taken.json"))
    assert "not found" in one_error_line(tool("evaluate.py", "mc", tmp_path, "--task", tmp_path / "none.jsonl"))
    assert "must be an L³ config" in one_error_line(tool("study.py", "--config", "configs/tiny_dense.yaml"))
    (tmp_path / "notes.md").write_text("my notes\n")
    assert "not written by tools/study.py" in one_error_line(tool("study.py", "--output", tmp_path / "notes.md"))


@pytest.mark.slow
def test_study_runs_end_to_end_skips_what_is_done_and_refuses_another_plan(tmp_path, tiny_corpus, tiny_allocation):
    config = write_config(tmp_path / "l3.yaml", tiny_l3_config(tmp_path / "unused", tiny_corpus, tiny_allocation))
    study, report = tmp_path / "study", tmp_path / "docs" / "results.md"
    args = ["--config", config, "--steps", "2", "--seeds", "1", "--mc-examples", "12", "--study-dir", study,
            "--output", report, "--threads", "1", "--quiet"]
    result = tool("study.py", *args, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    for label in ("iso-FLOP dense", "L³-LZW", "L³-uniform", "iso-sparse MoE"):
        assert f"| {label} |" in text
    for name in ("held_out.png", "loss_vs_tokens.png", "logit_lens.png", "entropy_vs_rows.png"):
        assert (report.parent / "results" / name).is_file() and f"results/{name}" in text
    evaluations = {path.stem: json.loads(path.read_text()) for path in (study / "evaluations").glob("*.json")}
    assert set(evaluations) == {"dense-seed0", "l3_lzw-seed0", "l3_uniform-seed0", "moe-seed0"}
    assert {e["tokens"] for e in evaluations.values()} == {2 * 8 * 64}  # equal training tokens
    assert {e["lm"]["tokens"] for e in evaluations.values()} == {evaluations["dense-seed0"]["lm"]["tokens"]}
    assert evaluations["l3_lzw-seed0"]["l3"]["0"]["positions"] == evaluations["dense-seed0"]["lm"]["tokens"]
    assert evaluations["moe-seed0"]["mc"]["examples"] + evaluations["moe-seed0"]["mc"]["skipped"] == 12
    assert "python -m l3train.train --config" in text and "tools/size_configs.py" in text
    # A rerun trains and evaluates nothing again, and rewrites the report.
    logs = {path: path.stat().st_mtime_ns for path in (study / "logs").iterdir()}
    stamps = {path: path.stat().st_mtime_ns for path in (study / "evaluations").iterdir()}
    result = tool("study.py", *args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in (study / "logs").iterdir()} == logs
    assert {path: path.stat().st_mtime_ns for path in (study / "evaluations").iterdir()} == stamps
    assert report.read_text().startswith("<!-- written by tools/study.py")
    changed = [arg if arg != "2" else "3" for arg in args]
    assert "planned with steps=2" in one_error_line(tool("study.py", *changed))


def test_a_second_study_on_the_same_directory_is_refused(tmp_path, tiny_corpus, tiny_allocation):
    """One study per --study-dir: the second would delete the first's runs before their first checkpoint."""
    config = write_config(tmp_path / "l3.yaml", tiny_l3_config(tmp_path / "unused", tiny_corpus, tiny_allocation))
    study = tmp_path / "study"
    first = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom l3train.run_lock import RunDirLock\n"
                              "RunDirLock(sys.argv[1], holder_kind='study').acquire()\nprint('locked', flush=True)\n"
                              "time.sleep(600)", str(study)], stdout=subprocess.PIPE, text=True, env=trainer_env())
    try:
        assert first.stdout.readline().strip() == "locked"
        (study / "runs" / "dense-seed0").mkdir(parents=True)  # the first study's run, before its checkpoint
        line = one_error_line(tool("study.py", "--config", config, "--steps", "2", "--seeds", "1", "--study-dir",
                                   study, "--output", tmp_path / "results.md", "--quiet"))
        assert f"another study (pid {first.pid} on host" in line and str(study) in line
        assert (study / "runs" / "dense-seed0").is_dir() and not (tmp_path / "results.md").exists()
    finally:
        first.kill()
        first.wait()

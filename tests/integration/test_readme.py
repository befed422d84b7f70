"""The README is tested: every command in its ```bash blocks runs here, as written.

REGISTRY maps each README command (one logical line: `# comments` and `\\` continuations
removed, blanks collapsed) to how it runs in the test and what it must do. The fast test
keeps REGISTRY and the README in step, so a new README command without an entry fails.
The slow test runs the entries in REGISTRY order in a throw-away copy of the repository:
the data tools write data/..., which the quick start then reuses and the training commands
read (configs/tiny_l3.yaml names data/...). A command runs as written plus `append`, words
that only make it short (`training.steps=2`, ...) or keep two commands' run directories
apart; nothing else is changed.

Commands that need a SLURM cluster run on the session's one cluster (root and slurm-wlm/munge),
which tests/conftest.py's `slurm_cluster` fixture starts and stops with the README's own
`cluster.sh start` and `cluster.sh stop` lines: those entries name the fixture (`run_by`), and
the fast test checks that it exists and runs those words. Likewise `scancel --signal=USR1
--batch` needs a job that is busy training when the signal comes, and requeues it: that is what
tests/integration/test_slurm.py::test_stopped_job_requeues_and_resumes does.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import pytest
from slurm_cluster import slurm_unavailable
from training_harness import REPO, free_port, trainer_env

README = REPO / "README.md"
# Shell variables that README lines set and later lines use (cluster.sh start -> SLURM_CONF):
# each command runs in its own bash, so they are carried in a state file.
STATE_VARS = ("SLURM_CONF",)


# ---------------------------------------------------------------------------------------
# The README's commands


def readme_commands(text: str) -> list[str]:
    """Every command line of the ```bash blocks (also those indented inside list items), in order."""
    commands: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        fence = line.strip()
        if block is None:
            if fence == "```bash":
                block = []
            continue
        if fence.startswith("```"):
            commands += _block_commands(block)
            block = None
        else:
            block.append(line)
    assert block is None, "README.md: a ```bash block is not closed"
    return commands


def _block_commands(lines: list[str]) -> list[str]:
    commands, pending = [], []
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()  # a comment: '#' at the start or after a blank
        pending.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            command = " ".join(" ".join(pending).split())
            if command:
                commands.append(command)
            pending = []
    assert not pending, f"README.md: a ```bash block ends in a continuation line: {lines[-1]!r}"
    return commands


# ---------------------------------------------------------------------------------------
# How each command runs, and what it must do


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass(frozen=True)
class Step:
    append: str = ""  # words appended to the command (inside a trailing `$(...)`, before its `)`)
    creates: tuple[str, ...] = ()  # paths in the copy: absent before the command, present after it
    prints: tuple[str, ...] = ()  # texts in its stdout + stderr
    check: Callable[["Workspace", Result], None] | None = None  # further checks after it ran
    before: Callable[["Workspace"], None] | None = None  # preparation in the copy
    runner: Callable[["Workspace", str], Result] | None = None  # instead of running it to its end
    env: Callable[[], dict[str, str]] | None = None  # extra environment
    status: int | None = 0  # expected exit status; None: `check` judges it
    slurm: bool = False  # needs the local SLURM cluster (root, slurm-wlm, munge)
    run_by: str = ""  # "<test file>::<test>" (under tests/) that runs this command instead, with these words
    run_by_words: tuple[str, ...] = ()
    timeout: int = 420


def short(steps: int = 2, run_dir: str = "", extend: bool = False) -> str:
    """Overrides that make a tiny run take seconds: eval and a checkpoint only at its end.
    `extend`: a resume of a run shortened to fewer steps (its schedule changes, which must be
    allowed)."""
    words = [f"training.steps={steps}", "optimizer.warmup_steps=1", f"training.eval_interval={steps}",
             "training.eval_batches=1", "training.log_interval=1", f"checkpoint.save_interval={steps}"]
    return " ".join(words + ([f"run_dir={run_dir}"] if run_dir else []) + (["--allow-config-change"] if extend else []))


def ckpt(run_dir: str, step: int) -> str:
    return f"{run_dir}/checkpoints/step_{step:08d}"


DATA = ("data/corpus/stdlib_docstrings.jsonl", "data/tokenizer/spm_bpe_2048.model",
        "data/indexed/stdlib_docstrings_text_document.idx", "data/allocation/lzw_v32768_k128.npz")


def remember_data_files(ws: "Workspace") -> None:
    ws.notes["data_mtimes"] = {path: (ws.root / path).stat().st_mtime_ns for path in DATA}


def data_files_reused(ws: "Workspace", result: Result) -> None:
    """The quick start skips data steps whose outputs exist: the data tools' files stay as they were."""
    assert {path: (ws.root / path).stat().st_mtime_ns for path in DATA} == ws.notes["data_mtimes"], \
        "launch/quickstart.sh rewrote data files that the data tools had made"
    assert "wrote data/" not in result.output, result.output[-3000:]


def setup_env_only_checked(ws: "Workspace", result: Result) -> None:
    """setup_env.sh created and installed nothing, ended with its import check, and left the real
    .venv's l3train install alone."""
    assert "[setup] ok: torch" in result.output, result.output[-3000:]
    assert "[setup] creating" not in result.output and "[setup] installing torch" not in result.output, \
        result.output[-3000:]
    assert editable_install_state() == ws.notes["editable_install"], \
        "tools/setup_env.sh in the copy changed the .venv's l3train install (PIP_DRY_RUN not honoured?)"


def quickstart_checks(ws: "Workspace", result: Result) -> None:
    data_files_reused(ws, result)
    setup_env_only_checked(ws, result)


def collected_tests(ws: "Workspace", result: Result) -> None:
    setup_env_only_checked(ws, result)
    found = re.search(r"(\d+) tests? collected", result.stdout)
    assert found and int(found.group(1)) > 300, result.output[-3000:]


def configs_load(*paths: str) -> Callable[["Workspace", Result], None]:
    def check(ws: "Workspace", result: Result) -> None:
        from l3train.config import load_config

        for path in paths:
            load_config(ws.root / path)  # validates the written config; raises on an invalid one
    return check


def report_lists(output_dir: str, *runs: str) -> Callable[["Workspace", Result], None]:
    def check(ws: "Workspace", result: Result) -> None:
        table = (ws.root / output_dir / "report.md").read_text()
        missing = [run for run in runs if f"| {run} " not in table]
        assert not missing, f"report.md has no row for {missing}:\n{table}"
        for plot in ("loss_vs_tokens.png", "val_loss_vs_active_params.png"):
            assert (ws.root / output_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return check


def rows_in_readme(prefix: str) -> Callable[["Workspace", Result], None]:
    """The command's table rows starting with `prefix` are in README.md as printed."""
    def check(ws: "Workspace", result: Result) -> None:
        rows = [line for line in result.stdout.splitlines() if line.startswith(prefix)]
        readme = (ws.root / "README.md").read_text()
        missing = [row for row in rows if row not in readme]
        assert rows and not missing, "README.md lacks these rows of the command's table:\n" + "\n".join(missing)
    return check


def gpu_bench_outcome(ws: "Workspace", result: Result) -> None:
    """Without CUDA the GPU benchmark must say so in its one-line error (exit status 2)."""
    import torch

    if torch.cuda.is_available():
        assert result.returncode == 0 and "device: " in result.stdout, result.output[-3000:]
        return
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [
        "error: tools/bench_l3_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)"], result.output


def serve_tensorboard(ws: "Workspace", command: str) -> Result:
    """Start the server on a free port, wait until it lists the quick start's run, stop it."""
    port = free_port()
    log = ws.tmp / "tensorboard.log"
    with log.open("w") as out:
        server = subprocess.Popen(["bash", "-c", ws.script(f"{command} --host 127.0.0.1 --port {port}")],
                                  cwd=ws.root, env=ws.env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.time() + 120
        runs: list[str] = []
        while not any(run.startswith("tiny_l3") for run in runs):
            assert server.poll() is None, f"tensorboard exited ({server.returncode}):\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"tensorboard lists runs {runs} after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as answer:
                    runs = json.loads(answer.read())
            except (urllib.error.URLError, ConnectionError):
                runs = []  # not listening yet
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the session started above: bash and tensorboard
        server.wait(timeout=30)
    return Result(0, f"runs: {runs}\n", log.read_text())


def write_corpus_shards(ws: "Workspace") -> None:
    """The README's many-shard command: the default corpus as two gzipped JSONL shards and a
    Parquet file (what a downloaded web corpus looks like)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (ws.root / "data/corpus/stdlib_docstrings.jsonl").read_bytes().splitlines(keepends=True)
    shards = ws.root / "data/shards"
    shards.mkdir(parents=True)
    third = len(lines) // 3
    for index in range(2):
        shard = b"".join(lines[index * third:(index + 1) * third])
        (shards / f"part-{index}.jsonl.gz").write_bytes(gzip.compress(shard))
    pq.write_table(pa.table({"text": [json.loads(line)["text"] for line in lines[2 * third:]]}),
                   shards / "extra.parquet")


def shorten_sweep_runs(ws: "Workspace") -> None:
    """The sweep file has no command-line overrides: add the short-run ones to its copy here."""
    sweep = ws.root / "configs/sweeps/tiny_lr.yaml"
    sweep.write_text(sweep.read_text() + f"overrides: [{', '.join(short().split())}]\n")


def sweep_trained(ws: "Workspace", result: Result) -> None:
    runs = json.loads((ws.root / "runs/studies/lr/study.json").read_text())["runs"]
    assert [run["name"] for run in runs] == ["tiny_l3-lr0.001", "tiny_l3-lr0.003"], runs
    for run in runs:
        log = Path(run["log"].replace("%j", run["job_id"]))
        record = ws.notes["cluster"].wait(run["job_id"], log, timeout=300)
        assert record["JobState"] == "COMPLETED", log.read_text()[-4000:] if log.exists() else record
        assert (Path(run["run_dir"]) / "checkpoints/step_00000002").is_dir(), run


def sweep_dry_run(ws: "Workspace", result: Result) -> None:
    lines = result.stdout.splitlines()
    assert [line.split()[2] for line in lines] == ["--job-name=tiny_l3-lr0.001", "--job-name=tiny_l3-lr0.003"], lines
    assert not (ws.root / "runs/studies/tiny_lr").exists()  # a dry run writes nothing


SLURM_TESTS = "test_slurm.py"  # under tests/ (found by name: test files may move into subfolders)

# In the order the slow test runs them (see the module docstring).
REGISTRY: dict[str, Step] = {
    # Data tools: they make the files the quick start reuses and the tiny configs read.
    ".venv/bin/python tools/build_corpus.py --output data/corpus/stdlib_docstrings.jsonl": Step(
        creates=("data/corpus/stdlib_docstrings.jsonl",), prints=("4455 documents",)),
    ".venv/bin/python tools/train_tokenizer.py --input data/corpus/stdlib_docstrings.jsonl "
    "--output-prefix data/tokenizer/spm_bpe_2048 --vocab-size 2048": Step(
        creates=("data/tokenizer/spm_bpe_2048.model",), prints=("vocab 2048",)),
    ".venv/bin/python tools/preprocess_data.py --input data/corpus/stdlib_docstrings.jsonl "
    "--tokenizer data/tokenizer/spm_bpe_2048.model --output-prefix data/indexed/stdlib_docstrings_text_document "
    "--workers 8": Step(
        creates=("data/indexed/stdlib_docstrings_text_document.bin", "data/indexed/stdlib_docstrings_text_document.idx"),
        prints=("4455 documents",)),
    ".venv/bin/python tools/preprocess_data.py --input 'data/shards/*.jsonl.gz' data/shards/extra.parquet "
    "--tokenizer data/tokenizer/spm_bpe_2048.model --output-prefix data/indexed/shards --workers 2": Step(
        before=write_corpus_shards, creates=("data/indexed/shards.bin", "data/indexed/shards.idx"),
        prints=("wrote data/indexed/shards.bin/.idx: 4455 documents",)),
    "bash launch/slurm/preprocess.sh 2 --input 'data/shards/*.jsonl.gz' data/shards/extra.parquet "
    "--tokenizer data/tokenizer/spm_bpe_2048.model --output-prefix data/indexed/shards_slurm": Step(
        run_by=f"{SLURM_TESTS}::test_preprocess_array_job_and_merge_give_the_one_process_dataset",
        run_by_words=("bash", "launch/slurm/preprocess.sh", "2", "--input", "--tokenizer", "--output-prefix")),
    ".venv/bin/python tools/lzw_allocate.py --data-prefix data/indexed/stdlib_docstrings_text_document "
    "-v 32768 -k 128 --output data/allocation/lzw_v32768_k128.npz": Step(
        creates=("data/allocation/lzw_v32768_k128.npz",), prints=("rows v = 32,768, cap k = 128",)),
    ".venv/bin/python tools/lzw_convergence.py --data-prefix data/indexed/stdlib_docstrings_text_document "
    "-v 32768 -k 128": Step(prints=("rows moved vs previous", "0.00%")),
    ".venv/bin/python tools/model_stats.py --config configs/tiny_l3.yaml": Step(
        prints=("9.948M", "1.576M", "2.790M")),  # the figures configs/tiny_l3.yaml's header states
    ".venv/bin/python tools/shard_plan.py --allocation data/allocation/lzw_v32768_k128.npz --shards 4": Step(
        prints=("4 shards",)),
    # Quick start: reuses the data above; a second invocation resumes runs/tiny_l3.
    "bash launch/quickstart.sh": Step(
        append=short(), before=remember_data_files, creates=(ckpt("runs/tiny_l3", 2),),
        prints=("starting from scratch", "9.948M"), check=quickstart_checks),
    "bash launch/quickstart.sh training.steps=1000 --allow-config-change": Step(
        append=short(3), creates=(ckpt("runs/tiny_l3", 3),), prints=("resuming at step 2",),
        check=quickstart_checks),
    ".venv/bin/tensorboard --logdir runs/": Step(runner=serve_tensorboard, prints=("tiny_l3/tensorboard",)),
    # The suite cannot run inside itself: collect it.
    "bash tools/setup_env.sh && .venv/bin/python -m pytest -q": Step(append="--collect-only", check=collected_tests),
    # Training: each fresh run gets its own run_dir (runs/tiny_l3 holds the quick start's).
    ".venv/bin/python -m l3train.train --config configs/tiny_l3.yaml": Step(
        append=short(run_dir="runs/readme_1proc"), creates=(ckpt("runs/readme_1proc", 2),),
        prints=("1 rank(s)", "starting from scratch")),
    # torchrun without --master_port takes 29500, which another torchrun on this machine may
    # hold: PET_MASTER_PORT (torchrun's environment form of --master_port) picks a free one.
    ".venv/bin/torchrun --nproc_per_node 2 -m l3train.train --config configs/tiny_l3.yaml": Step(
        append=short(run_dir="runs/readme_2proc"), env=lambda: {"PET_MASTER_PORT": str(free_port())},
        creates=(ckpt("runs/readme_2proc", 2),), prints=("2 rank(s)",)),
    ".venv/bin/python -m l3train.train --config configs/tiny_l3.yaml --resume": Step(
        append=short(3, run_dir="runs/readme_1proc", extend=True), creates=(ckpt("runs/readme_1proc", 3),),
        prints=("resuming at step 2",)),
    ".venv/bin/python -m l3train.train --config configs/tiny_l3.yaml training.steps=1000 parallel.zero_stage=2": Step(
        append=short(run_dir="runs/readme_zero2"), creates=(ckpt("runs/readme_zero2", 2),),
        prints=("ZeRO-0 (parallel.zero_stage=2 partitions nothing over one data-parallel rank)",)),
    # Sizing and the tiny family's report.
    ".venv/bin/python tools/size_configs.py --config configs/paper_800m_l3.yaml --rows 710000 --mean-rows 300 "
    "--output-dense d.yaml --output-moe m.yaml": Step(
        creates=("d.yaml", "m.yaml"), prints=("iso-FLOP dense", "iso-sparse MoE"), check=configs_load("d.yaml", "m.yaml")),
    ".venv/bin/python -m l3train.train --config configs/tiny_dense.yaml": Step(
        append=short(), creates=(ckpt("runs/tiny_dense", 2),)),
    ".venv/bin/python -m l3train.train --config configs/tiny_moe.yaml": Step(
        append=short(), creates=(ckpt("runs/tiny_moe", 2),)),
    ".venv/bin/python -m l3train.train --config configs/tiny_l3_moe.yaml": Step(
        append=short(), creates=(ckpt("runs/tiny_l3_moe", 2),)),
    ".venv/bin/python tools/report.py runs/tiny_dense runs/tiny_l3 runs/tiny_moe runs/tiny_l3_moe --output reports/tiny":
        Step(creates=("reports/tiny/report.md",), prints=("report of 4 run(s)",),
             check=report_lists("reports/tiny", "tiny_dense", "tiny_l3", "tiny_moe", "tiny_l3_moe")),
    # Memory planning: the paper tables are the README's, row for row.
    ".venv/bin/python tools/memory_plan.py --config configs/tiny_l3.yaml --nodes 1 --gpus-per-node 4": Step(
        prints=("| tiny_l3 | 1×4 | 1×4 | 1, fp32 |",)),
    ".venv/bin/python tools/memory_plan.py --config configs/paper_800m_l3.yaml --config configs/paper_1p5b_l3.yaml "
    "--config configs/paper_2p6b_l3.yaml --nodes 1 --nodes 4 --gpus-per-node 8 --rows 710000": Step(
        check=rows_in_readme("| paper_")),
    ".venv/bin/python tools/memory_plan.py --config configs/paper_2p6b_l3.yaml --config configs/paper_2p6b_dense.yaml "
    "--config configs/paper_2p6b_moe.yaml --nodes 1 --gpus-per-node 8 --rows 710000 training.recompute=blocks": Step(
        check=rows_in_readme("| paper_")),
    # Conversion: the quick start's L³ run and the dense baseline above.
    ".venv/bin/python tools/convert_checkpoint.py consolidate runs/tiny_l3 --output ckpt/tiny_l3": Step(
        creates=("ckpt/tiny_l3/model.safetensors", "ckpt/tiny_l3/manifest.json"),
        prints=("wrote consolidated checkpoint",)),
    ".venv/bin/python tools/convert_checkpoint.py reshard runs/tiny_l3 --output runs/tiny_l3_tp2 --nproc 2 "
    "parallel.tensor_parallel=2": Step(creates=(ckpt("runs/tiny_l3_tp2", 3),), prints=("continue with",)),
    ".venv/bin/torchrun --nproc_per_node 2 -m l3train.train --config runs/tiny_l3_tp2/config.yaml --resume": Step(
        append=short(4, extend=True), env=lambda: {"PET_MASTER_PORT": str(free_port())},
        creates=(ckpt("runs/tiny_l3_tp2", 4),), prints=("resuming at step 3", "TP=2")),
    ".venv/bin/python tools/convert_checkpoint.py export runs/tiny_l3 --output hf/tiny_l3": Step(
        creates=("hf/tiny_l3/config.json", "hf/tiny_l3/modeling_l3train.py"), prints=("wrote Hugging Face folder",)),
    ".venv/bin/python tools/convert_checkpoint.py export runs/tiny_dense --output hf/tiny_dense": Step(
        creates=("hf/tiny_dense/config.json", "hf/tiny_dense/model.safetensors"),
        prints=("wrote Hugging Face folder",)),
    ".venv/bin/python tools/convert_checkpoint.py import hf/tiny_dense --config configs/tiny_dense_plus_l3.yaml "
    "--output ckpt/tiny_dense_plus_l3": Step(
        creates=("ckpt/tiny_dense_plus_l3/model.safetensors",), prints=("wrote consolidated checkpoint",)),
    ".venv/bin/python -m l3train.train --config configs/tiny_dense_plus_l3.yaml --init-from ckpt/tiny_dense_plus_l3":
        Step(append=short(), creates=(ckpt("runs/tiny_dense_plus_l3", 2),),
             prints=("starting from the weights of ckpt/tiny_dense_plus_l3",)),
    ".venv/bin/python tools/inspect_checkpoint.py runs/tiny_l3 --tensors": Step(
        prints=("manifest: OK", "lookups.1.lookup.rows.key_table")),
    # Evaluation of the quick start's run; the study itself takes half an hour: its end-to-end
    # test runs it at a budget of 2 steps.
    ".venv/bin/python tools/evaluate.py lm runs/tiny_l3": Step(prints=("perplexity", "bits per byte")),
    ".venv/bin/python tools/evaluate.py mc runs/tiny_l3 --task configs/tasks/stdlib_continuation_example.jsonl":
        Step(prints=("length-normalised accuracy",)),
    ".venv/bin/python tools/evaluate.py diagnostics runs/tiny_l3 --output reports/tiny_l3_diag": Step(
        prints=("logit lens KL", "wrote reports/tiny_l3_diag")),
    ".venv/bin/python tools/study.py": Step(
        run_by="test_eval_tools.py::test_study_runs_end_to_end_skips_what_is_done_and_refuses_another_plan",
        run_by_words=("study.py",)),
    # Benchmarks: bench_core on fewer tokens and positions, one repetition.
    ".venv/bin/python tools/bench_core.py --data-prefix data/indexed/stdlib_docstrings_text_document --vocab-size 2048":
        Step(append="--tokens 100000 --positions 256 --repeats 1", prints=("(identical)", "speed-up", "padded")),
    ".venv/bin/python tools/bench_l3_gpu.py": Step(
        append="--positions 1024 --vocab 4096 --iters 2", status=None, check=gpu_bench_outcome),
    # Launching: local.sh trains and resumes on 2 processes in its own test, with these words.
    "launch/local.sh 2 configs/tiny_l3.yaml training.steps=100": Step(
        run_by="test_launch.py::test_local_sh_trains_on_two_processes_and_resumes",
        run_by_words=("launch/local.sh", "2")),
    "launch/local.sh 2 configs/tiny_l3.yaml --resume": Step(
        run_by="test_launch.py::test_local_sh_trains_on_two_processes_and_resumes",
        run_by_words=("launch/local.sh", "2", "--resume")),
    ".venv/bin/python launch/sweep.py configs/sweeps/tiny_lr.yaml --dry-run": Step(
        prints=("dry run: 2 job(s), nothing submitted",), check=sweep_dry_run),
    # SLURM, on the README's test cluster.
    'export "$(launch/slurm/cluster.sh start | tail -n 1)"': Step(
        run_by="conftest.py::slurm_cluster", run_by_words=('export "$(launch/slurm/cluster.sh start | tail -n 1)"',)),
    "JOB=$(sbatch --parsable --nodes 2 launch/slurm/pretrain.sbatch configs/tiny_l3.yaml optimizer.lr=1.0e-3)": Step(
        run_by=f"{SLURM_TESTS}::test_two_node_job_trains_and_checkpoints",
        run_by_words=("sbatch", "--parsable", "--nodes", "2", "launch/slurm/pretrain.sbatch", "optimizer.lr=1.0e-3")),
    'scancel --signal=USR1 --batch "$JOB"': Step(
        run_by=f"{SLURM_TESTS}::test_stopped_job_requeues_and_resumes",
        run_by_words=("scancel", "--signal=USR1", "--batch")),
    ".venv/bin/python launch/sweep.py configs/sweeps/tiny_lr.yaml --study-dir runs/studies/lr": Step(
        slurm=True, before=shorten_sweep_runs, creates=("runs/studies/lr/study.json",), prints=("2 job(s)",),
        check=sweep_trained),
    ".venv/bin/python tools/report.py runs/studies/lr --output reports/lr": Step(
        slurm=True, creates=("reports/lr/report.md",), prints=("report of 2 run(s)",),
        check=report_lists("reports/lr", "tiny_l3-lr0.001", "tiny_l3-lr0.003")),
    'launch/slurm/cluster.sh stop "$(dirname "$SLURM_CONF")"': Step(
        run_by="conftest.py::slurm_cluster", run_by_words=('launch/slurm/cluster.sh stop "$(dirname "$SLURM_CONF")"',)),
}


def with_appended(command: str, words: str) -> str:
    if not words:
        return command
    if command.endswith(")") and "$(" in command:  # JOB=$(sbatch ...): the words belong to sbatch
        return f"{command[:-1]} {words})"
    return f"{command} {words}"


def editable_install_state() -> dict[str, str]:
    """sha256 of the files that point the .venv's l3train at its source tree (pip install -e .)."""
    site = sorted((REPO / ".venv" / "lib").glob("python*/site-packages"))
    files = [path for root in site for pattern in ("__editable__*l3train*", "l3train-*.dist-info/*")
             for path in root.glob(pattern) if path.is_file()]
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


# ---------------------------------------------------------------------------------------
# The throw-away repository


@dataclass
class Workspace:
    root: Path
    tmp: Path
    env: dict[str, str]
    notes: dict

    @property
    def state_file(self) -> Path:
        return self.tmp / "shell_state.sh"

    def script(self, command: str) -> str:
        """bash text that runs `command` with the shell variables earlier commands set, and saves them."""
        names = " ".join(STATE_VARS)
        return (f"set -euo pipefail\n[ ! -f {self.state_file} ] || source {self.state_file}\n{command}\n"
                f"declare -p {names} >{self.state_file}.new 2>/dev/null || true\n"
                f"mv {self.state_file}.new {self.state_file}\n")

    def run(self, command: str, extra_env: dict[str, str], timeout: int) -> Result:
        result = subprocess.run(["bash", "-c", self.script(command)], cwd=self.root, env={**self.env, **extra_env},
                                capture_output=True, text=True, timeout=timeout)
        return Result(result.returncode, result.stdout, result.stderr)


def make_workspace(tmp_path: Path) -> Workspace:
    """Copy the repository's tracked and untracked-but-not-ignored files (what a clone plus the
    uncommitted work holds; no data/, runs/ or .venv) into tmp_path/repo, and give it a .venv."""
    root = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # ls-files also lists tracked files deleted in the work tree
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    # The copy's .venv/bin holds one `exec` wrapper per executable of the real .venv, instead of
    # a symlink to the real .venv: through a symlink Python's sys.prefix becomes the copy's path,
    # and DeepSpeed rebuilds its JIT CPU op (~60 s) in the shared TORCH_EXTENSIONS_DIR for the new
    # source paths, and every later run from the real repository rebuilds it back. The wrappers
    # run the real interpreter, so paths and the op build stay those of the real .venv.
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in sorted((REPO / ".venv" / "bin").iterdir()):
        if tool.is_file() and os.access(tool, os.X_OK):
            (bin_dir / tool.name).write_text(f'#!/bin/sh\nexec "{tool}" "$@"\n')
            (bin_dir / tool.name).chmod(0o755)
    env = trainer_env()  # CPU DeepSpeed, 1 thread, shared JIT op cache, test dataset cache
    # setup_env.sh (run by the quick start and the test command) ends with
    # `pip install --no-deps -e .`: in the copy, that would point the real .venv's editable
    # l3train at this temporary directory, which is deleted after the test. PIP_DRY_RUN=1
    # (pip's environment form of `pip install --dry-run`, pip >= 22.2) makes every pip install
    # only resolve and report: setup_env.sh then only checks that the requirements are
    # installed and importable, as on a second run. The test checks the install is unchanged.
    # PYTHONPATH=copy: l3train is imported from the copy (as its own editable install would).
    env.update(PIP_DRY_RUN="1", PYTHONPATH=str(root))
    env.pop("SLURM_CONF", None)  # only the README's own cluster, through the state file
    return Workspace(root, tmp_path, env, {"editable_install": editable_install_state()})


# ---------------------------------------------------------------------------------------
# Tests


def test_every_readme_command_is_registered():
    commands = readme_commands(README.read_text())
    assert len(commands) == len(set(commands)), "a README command is shown twice"
    missing = [c for c in commands if c not in REGISTRY]
    stale = [c for c in REGISTRY if c not in commands]
    assert not missing and not stale, (
        f"README commands without a REGISTRY entry in {Path(__file__).name}: {missing}\n"
        f"REGISTRY entries no longer in README.md: {stale}")


def test_extraction_joins_continuations_and_drops_comments():
    text = "x\n```bash\n# only a comment\na --b \\\n    --c d   # note\n  e \"$(f)\"\n```\n```python\nnot this\n```\n"
    assert readme_commands(text) == ["a --b --c d", 'e "$(f)"']


@pytest.mark.parametrize("command", [c for c, step in REGISTRY.items() if step.run_by])
def test_commands_run_elsewhere_are_run_by_the_named_test(command):
    """The named test exists and passes each of the command's words to a subprocess."""
    step = REGISTRY[command]
    file_name, test_name = step.run_by.split("::")
    sources = sorted((REPO / "tests").rglob(file_name))
    assert len(sources) == 1, f"{file_name}: found {sources} under tests/"
    tree = ast.parse(sources[0].read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == test_name]
    assert functions, f"{step.run_by} not found"
    strings = {node.value for node in ast.walk(functions[0]) if isinstance(node, ast.Constant)}
    missing = [word for word in step.run_by_words if word not in strings]
    assert not missing, f"{step.run_by} does not pass {missing}"
    assert all(word in command for word in step.run_by_words)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~6 minutes on 2 idle cores; pytest.ini's 900 s is too tight on a busy machine
def test_readme_commands_run_as_written(tmp_path, request):
    assert (REPO / ".venv" / "bin" / "python").exists(), "the README's commands need the repository's .venv"
    assert tuple(int(p) for p in version("pip").split(".")[:2]) >= (22, 2), "PIP_DRY_RUN needs pip >= 22.2"
    no_slurm = slurm_unavailable()
    if no_slurm and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the README's SLURM commands: {no_slurm}")
    ws = make_workspace(tmp_path)
    if not no_slurm:  # the session's cluster, as the README's `export "$(... cluster.sh start ...)"` leaves it
        ws.notes["cluster"] = request.getfixturevalue("slurm_cluster")
        ws.state_file.write_text(f'declare -x SLURM_CONF="{ws.notes["cluster"].conf}"\n')
    timings: list[tuple[float, str]] = []
    not_run: list[str] = []
    try:
        for command, step in REGISTRY.items():
            if step.run_by or (step.slurm and no_slurm):
                not_run += [] if step.run_by else [command]
                continue
            for path in step.creates:
                assert not (ws.root / path).exists(), f"{path} exists before `{command}` runs: its check proves nothing"
            if step.before:
                step.before(ws)
            started = time.time()
            if step.runner:
                result = step.runner(ws, with_appended(command, step.append))
            else:
                result = ws.run(with_appended(command, step.append), step.env() if step.env else {}, step.timeout)
            timings.append((time.time() - started, command))
            where = f"`{with_appended(command, step.append)}` (exit status {result.returncode}):\n" \
                    f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            if step.status is not None:
                assert result.returncode == step.status, where
            for text in step.prints:
                assert text in result.output, f"{text!r} not printed by {where}"
            for path in step.creates:
                assert (ws.root / path).exists(), f"{path} not written by {where}"
            if step.check:
                step.check(ws, result)
    finally:
        assert editable_install_state() == ws.notes["editable_install"], "the .venv's l3train install changed"
        print("\n".join(f"{seconds:6.1f} s  {command}" for seconds, command in timings))
        print(f"{sum(seconds for seconds, _ in timings):6.1f} s  in all")
    # ~2 GB of checkpoints; pytest keeps the last three sessions' tmp_path. Kept when a check failed.
    shutil.rmtree(ws.root / "runs", ignore_errors=True)
    if not_run:
        pytest.skip(f"{no_slurm}: not run: {not_run}")

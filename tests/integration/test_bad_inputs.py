"""Bad inputs end cleanly: every entry point, given a wrong input, exits with status 2 and one
`error: ...` line naming the problem, and changes nothing on disk.

CASES is the table: one `Case` per bad input to `python -m l3train.train`, every tool in
tools/ and the launchers. A case builds its inputs in the test's tmp_path through the
`Workspace` (copies of the session's tiny corpus, tokenizer, dataset and allocation from
tests/conftest.py, configs, broken files) and returns the command line; the command runs
with tmp_path as its working directory. The test then asserts

- exit status 2;
- stderr's last non-empty line starts with `error: ` and contains the case's `expect` text;
- the error is one line: stderr is exactly that line for the Python entry points; the bash
  launchers may print more (torchrun's report), but every `error: ` line is that same line,
  repeated last (what launch/lib.sh guarantees);
- nothing under tmp_path changed: every file keeps its sha256 and mtime, none is removed, and
  none is added except the case's `scratch` (globs of resumable partial work).

Adding a case is adding one entry to CASES.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from training_harness import REPO, tiny_l3_config, trainer_env

PY = sys.executable


class Workspace:
    """The inputs of one case, all under `root` (the test's tmp_path): copies of the session
    fixtures, so that a command that wrongly writes can never damage them."""

    def __init__(self, root: Path, corpus, allocation: Path, trained: Path | None = None) -> None:
        self.root, self._corpus, self._allocation, self._trained = root, corpus, allocation, trained

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)

    def _copy(self, source: Path, name: str) -> str:
        target = self.root / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return str(target)

    def corpus(self) -> str:
        """The tiny corpus as JSONL."""
        return self._copy(self._corpus.jsonl_path, "corpus.jsonl")

    def tokenizer(self, prefix: str = "tokenizer") -> str:
        """The tiny corpus's sentencepiece model (<prefix>.model, with its .vocab)."""
        self._copy(self._corpus.tokenizer_path.with_suffix(".vocab"), f"{prefix}.vocab")
        return self._copy(self._corpus.tokenizer_path, f"{prefix}.model")

    def dataset(self, name: str = "data") -> str:
        """The tiny corpus preprocessed: <prefix>.bin/.idx/.meta.json; returns the prefix."""
        for suffix in (".bin", ".idx", ".meta.json"):
            self._copy(Path(self._corpus.data_prefix + suffix), name + suffix)
        return self.path(name)

    def allocation(self, name: str = "allocation.npz") -> str:
        return self._copy(self._allocation, name)

    def config(self, name: str = "config.yaml", **sections: dict) -> str:
        """The tiny L³ config of tests/training_harness.py on copies of the fixtures (run_dir:
        <root>/run), with `sections` merged in: config(training={"steps": 3})."""
        inputs = type("Inputs", (), {"vocab_size": self._corpus.vocab_size, "data_prefix": self.dataset(),
                                     "tokenizer_path": self.tokenizer()})
        tree = tiny_l3_config(self.root / "run", inputs, Path(self.allocation()))
        for section, values in sections.items():
            tree[section] = {**tree.get(section, {}), **copy.deepcopy(values)}
        return self.write(name, yaml.safe_dump(tree, sort_keys=False))


    def trained_run(self, **sections: dict) -> str:
        """A copy of the session's tiny L³ run (12 steps, checkpoints at 6 and 12) as <root>/run;
        returns its config (the one it was trained with, run_dir moved, `sections` merged in)."""
        shutil.copytree(self._trained, self.root / "run")
        tree = yaml.safe_load((self._trained / "config.yaml").read_text())
        tree["run_dir"] = str(self.root / "run")
        for section, values in sections.items():
            tree[section] = {**tree[section], **values}
        return self.write("config.yaml", yaml.safe_dump(tree, sort_keys=False))

    def checkpoint_file(self, name: str, tag: str = "step_00000012") -> Path:
        return self.root / "run" / "checkpoints" / tag / name


@pytest.fixture(scope="module")
def trained_run(shared_runs) -> Path:
    return shared_runs.get("tiny_l3").run_dir


# ---------------------------------------------------------------------------------------
# Command lines and broken inputs


def train(*args: str) -> list[str]:
    return [PY, "-m", "l3train.train", *args]


def tool(name: str, *args: str) -> list[str]:
    return [PY, str(REPO / "tools" / f"{name}.py"), *args]


def sweep(*args: str) -> list[str]:
    return [PY, str(REPO / "launch" / "sweep.py"), *args]


def launcher(script: str, *args: str) -> list[str]:
    return ["bash", str(REPO / "launch" / script), *args]


def truncate_idx(prefix: str) -> str:
    """Cut the dataset's .idx in half (a copy interrupted mid-transfer)."""
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    return prefix


def retokenized(prefix: str) -> str:
    """Make the dataset's meta name another tokenizer, as if preprocessed with a different model."""
    meta = Path(f"{prefix}.meta.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "tokenizer_id": "0123456789abcdef"}))
    return prefix


def foreign_allocation(ws: Workspace) -> str:
    """A valid allocation file for another vocabulary (256 tokens)."""
    from l3train.allocation import Allocation, uniform_allocation

    rows = uniform_allocation(256, 1024, 8)
    Allocation(rows, rows * 0, 256, 1024, 8, "uniform", "0123456789abcdef", "none", 0).save(ws.path("other.npz"))
    return ws.path("other.npz")


def with_checkpoint(ws: Workspace) -> str:
    """A config whose run_dir already holds a checkpoint."""
    ws.write("run/checkpoints/step_00000006/config.yaml", "{}\n")
    ws.write("run/checkpoints/latest", "step_00000006\n")
    return ws.config()


def resume_damaged(ws: Workspace, damage: Callable[[Workspace], None]) -> list[str]:
    config = ws.trained_run()
    damage(ws)
    return train("--config", config, "--resume")


def overwrite_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))


def locked_run_dir(ws: Workspace) -> str:
    """A config whose run_dir is locked by a live process (this test process)."""
    from l3train.run_lock import RunDirLock

    config = ws.config()
    RunDirLock(ws.path("run")).acquire()  # held until this test process ends
    return config


def run_dir_with_metrics(ws: Workspace, metrics: str) -> str:
    """A run directory as the trainer leaves it: config.yaml and metrics.jsonl."""
    ws.write("run/config.yaml", Path(ws.config()).read_text())
    ws.write("run/metrics.jsonl", metrics)
    return ws.path("run")


def sweep_file(ws: Workspace, tree: dict) -> str:
    return ws.write("sweep.yaml", yaml.safe_dump(tree))


# ---------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Case:
    id: str
    command: Callable[[Workspace], list[str]]  # builds the inputs, returns the command line
    expect: str  # a text of the error line
    scratch: tuple[str, ...] = ()  # globs (relative to tmp_path) of files the command may leave
    env: dict[str, str] = field(default_factory=dict)  # extra environment; "{root}" is tmp_path
    slow: bool = False  # gets as far as starting torch.distributed and DeepSpeed (~10 s)
    xfail: str = ""  # a known bug, with where it must be fixed


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": "{root}"}  # what sbatch gives the batch script

CASES = [
    # python -m l3train.train: the config and the command line
    Case("train-unknown-config-key", lambda w: train("--config", w.config(training={"bogus": 1})),
         "training.bogus: unknown key"),
    Case("train-wrong-type", lambda w: train("--config", w.config(training={"steps": "many"})),
         "training.steps: expected int"),
    Case("train-bad-literal-value", lambda w: train("--config", w.config(training={"precision": "fp8"})),
         "training.precision: must be one of"),
    Case("train-missing-config-file", lambda w: train("--config", "missing.yaml"),
         "config file missing.yaml not found"),
    Case("train-invalid-yaml", lambda w: train("--config", w.write("config.yaml", "model: [d_model: 64\n")),
         "is not valid YAML"),
    Case("train-override-without-equals", lambda w: train("--config", w.config(), "training.steps"),
         "override 'training.steps': expected key.sub=value"),
    Case("train-override-through-a-value", lambda w: train("--config", w.config(), "training.steps.max=3"),
         "override training.steps.max: training.steps is not a section"),
    Case("train-override-unparsable-value", lambda w: train("--config", w.config(), "l3.after_blocks=[1"),
         "override l3.after_blocks: cannot parse value '[1'"),
    Case("train-abbreviated-flag", lambda w: train("--config", w.config(), "--resum"),
         "unrecognized arguments: --resum"),
    Case("train-allow-config-change-without-resume", lambda w: train("--config", w.config(), "--allow-config-change"),
         "--allow-config-change only applies with --resume"),
    Case("train-tp-not-dividing-world-size",
         lambda w: train("--config", w.config(), "parallel.tensor_parallel=2"),
         "parallel.tensor_parallel=2 must divide the number of ranks (1)"),
    Case("train-batch-not-dividing-over-ranks", lambda w: train("--config", w.config()),
         "training.global_batch_size=8 must be a multiple of the", env={"WORLD_SIZE": "3"}),
    Case("train-exit-after-steps-negative", lambda w: train("--config", w.config(), "--exit-after-steps", "-1"),
         "--exit-after-steps must be >= 0, got -1"),
    Case("train-unknown-flag", lambda w: train("--config", w.config(), "--bogus"),
         "unrecognized arguments: --bogus"),
    Case("train-no-config-flag", lambda w: train("training.steps=3"),
         "the following arguments are required: --config"),
    Case("train-fresh-run-over-checkpoints", lambda w: train("--config", with_checkpoint(w)),
         "already holds checkpoints (newest step_00000006); pass --resume"),
    Case("train-run-dir-locked-by-a-live-trainer", lambda w: train("--config", locked_run_dir(w)),
         f"another trainer (pid {os.getpid()} on host"),
    # python -m l3train.train --resume: damaged checkpoints and changed configs (found once the
    # ranks are up and the engine exists, before anything is loaded)
    Case("resume-64-bytes-overwritten",
         lambda w: resume_damaged(w, lambda w: overwrite_64_bytes(w.checkpoint_file("mp_rank_00_model_states.pt"))),
         "(corrupted); the newest older checkpoint that verifies is step_00000006", slow=True),
    Case("resume-checkpoint-file-deleted",
         lambda w: resume_damaged(w, lambda w: w.checkpoint_file("mp_rank_00_model_states.pt").unlink()),
         "mp_rank_00_model_states.pt is missing; the newest older checkpoint that verifies is step_00000006",
         slow=True),
    Case("resume-checkpoint-file-truncated",
         lambda w: resume_damaged(w, lambda w: os.truncate(w.checkpoint_file("config.yaml"), 10)),
         "has 10 bytes, the manifest records", slow=True),
    Case("resume-manifest-missing", lambda w: resume_damaged(w, lambda w: w.checkpoint_file("manifest.json").unlink()),
         "manifest.json is missing", slow=True),
    Case("resume-latest-names-a-missing-checkpoint",
         lambda w: resume_damaged(w, lambda w: w.write("run/checkpoints/latest", "step_00000099\n")),
         "names checkpoint 'step_00000099', which does not exist", slow=True),
    Case("resume-changed-training-steps",
         lambda w: train("--config", w.trained_run(training={"steps": 24}), "--resume"),
         "training.steps: 12 -> 24 would change the training trajectory", slow=True),
    Case("resume-changed-architecture",
         lambda w: train("--config", w.trained_run(model={"ffn_hidden_size": 96}), "--resume"),
         "it was written with model.ffn_hidden_size=128 but the config has 96", slow=True),
    # python -m l3train.train: data, tokenizer and allocation files (found once the ranks are up)
    Case("train-missing-data-prefix", lambda w: train("--config", w.config(data={"prefixes": [w.path("none")]})),
         "dataset file missing: ", slow=True),
    Case("train-truncated-idx",
         lambda w: train("--config", w.config(data={"prefixes": [truncate_idx(w.dataset("cut"))]})),
         "cut.idx is corrupt", slow=True),
    Case("train-dataset-tokenizer-mismatch",
         lambda w: train("--config", w.config(data={"prefixes": [retokenized(w.dataset("other"))]})),
         "was tokenized with tokenizer 0123456789abcdef", slow=True),
    Case("train-allocation-missing", lambda w: train("--config", w.config(l3={"allocation": w.path("none.npz")})),
         "none.npz does not exist", slow=True),
    Case("train-allocation-corrupt",
         lambda w: train("--config", w.config(l3={"allocation": w.write("bad.npz", b"PK\x03\x04 not a zip")})),
         "bad.npz is not an l3train allocation file or is corrupt", slow=True),
    Case("train-allocation-wrong-vocab",
         lambda w: train("--config", w.config(l3={"allocation": foreign_allocation(w)})),
         "is for a vocabulary of 256 tokens, but the config's vocab size is 512", slow=True),
    # tools/preprocess_data.py
    Case("preprocess-over-existing-dataset",  # issue #9: this replaced a 492K-token dataset
         lambda w: tool("preprocess_data", "--input", w.corpus(), "--tokenizer", w.tokenizer(),
                        "--output-prefix", w.dataset()),
         "data.bin already exists (a tokenized dataset: <prefix>.bin/.idx/.meta.json); pass --overwrite"),
    Case("preprocess-missing-input",
         lambda w: tool("preprocess_data", "--input", "none.jsonl", "--tokenizer", w.tokenizer(),
                        "--output-prefix", "out"),
         "input file not found: none.jsonl"),
    Case("preprocess-invalid-jsonl",
         lambda w: tool("preprocess_data", "--input", w.write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n'),
                        "--tokenizer", w.tokenizer(), "--output-prefix", "out", "--quiet"),
         "bad.jsonl:2: invalid JSON", scratch=("out.parts", "out.parts/*")),  # resumable work kept
    Case("preprocess-zero-workers",
         lambda w: tool("preprocess_data", "--input", w.corpus(), "--tokenizer", w.tokenizer(),
                        "--output-prefix", "out", "--workers", "0"),
         "--workers must be at least 1, got 0"),
    # tools/train_tokenizer.py
    Case("tokenizer-over-existing-model",
         lambda w: tool("train_tokenizer", "--input", w.corpus(), "--output-prefix", w.tokenizer("tok")[:-6],
                        "--vocab-size", "300"),
         "tok.model already exists (a sentencepiece tokenizer"),
    Case("tokenizer-missing-input",
         lambda w: tool("train_tokenizer", "--input", "none.txt", "--output-prefix", "tok"),
         "input file not found: none.txt"),
    Case("tokenizer-invalid-jsonl",
         lambda w: tool("train_tokenizer", "--input", w.write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n'),
                        "--output-prefix", "tok", "--vocab-size", "300"),
         "bad.jsonl:2: invalid JSON"),
    Case("tokenizer-vocab-too-small",
         lambda w: tool("train_tokenizer", "--input", w.corpus(), "--output-prefix", "tok", "--vocab-size", "100"),
         "--vocab-size must be at least 260"),
    # tools/build_corpus.py
    Case("corpus-over-existing-output",
         lambda w: tool("build_corpus", "--output", w.write("corpus.jsonl", '{"text": "mine"}\n')),
         "corpus.jsonl already exists (a corpus JSONL or its .meta.json record)"),
    Case("corpus-missing-stdlib", lambda w: tool("build_corpus", "--output", "c.jsonl", "--stdlib", "nowhere"),
         "standard library directory not found: nowhere"),
    # tools/lzw_allocate.py
    Case("allocate-over-existing-output",
         lambda w: tool("lzw_allocate", "--data-prefix", w.dataset(), "-v", "4096", "--output", w.allocation()),
         "allocation.npz already exists (an L³ allocation file)"),
    Case("allocate-truncated-idx",
         lambda w: tool("lzw_allocate", "--data-prefix", truncate_idx(w.dataset()), "-v", "4096", "--output", "a.npz"),
         "data.idx is corrupt"),
    Case("allocate-text-without-tokenizer",
         lambda w: tool("lzw_allocate", "--text", w.write("c.txt", "some text\n"), "-v", "4096", "--output", "a.npz"),
         "--text needs --tokenizer"),
    Case("allocate-budget-below-vocab",
         lambda w: tool("lzw_allocate", "--data-prefix", w.dataset(), "-v", "100", "--output", "a.npz"),
         "smaller than the vocab size"),
    # tools/shard_plan.py
    Case("shard-plan-over-existing-output",
         lambda w: tool("shard_plan", "--allocation", w.allocation(), "--shards", "2",
                        "--output", w.write("plan.npz", b"my plan")),
         "plan.npz already exists (a shard plan file)"),
    Case("shard-plan-corrupt-allocation",
         lambda w: tool("shard_plan", "--allocation", w.write("bad.npz", b"\x00" * 64), "--shards", "2"),
         "bad.npz is not an l3train allocation file or is corrupt"),
    Case("shard-plan-dataset-tokenizer-mismatch",
         lambda w: tool("shard_plan", "--allocation", w.allocation(), "--shards", "2",
                        "--data-prefix", retokenized(w.dataset())),
         "was tokenized with tokenizer 0123456789abcdef"),
    # tools/size_configs.py
    Case("size-configs-over-existing-output",
         lambda w: tool("size_configs", "--config", str(REPO / "configs/tiny_l3.yaml"), "--rows", "32768",
                        "--mean-rows", "30", "--output-dense", w.write("dense.yaml", "# mine\n")),
         "dense.yaml already exists (a config file)"),
    Case("size-configs-dense-input",
         lambda w: tool("size_configs", "--config", str(REPO / "configs/tiny_dense.yaml")),
         "has no L³ layers"),
    Case("size-configs-missing-allocation",
         lambda w: tool("size_configs", "--config", w.config(l3={"allocation": "none.npz"})),
         "l3.allocation none.npz not found"),
    # tools/report.py
    Case("report-over-existing-report",
         lambda w: tool("report", run_dir_with_metrics(w, '{"step": 1, "train/loss": 5.0}\n'),
                        "--output", str(Path(w.write("reports/report.md", "# mine\n")).parent)),
         "report.md already exists (a report of tools/report.py)"),
    Case("report-missing-run-dir", lambda w: tool("report", "nowhere", "--output", "reports"),
         "run directory nowhere not found"),
    Case("report-corrupt-metrics",  # a half-written last line is a live run's, and ignored
         lambda w: tool("report", run_dir_with_metrics(w, '{not json\n{"step": 1, "train/loss": 5.0}\n'),
                        "--output", "rep"),
         "metrics.jsonl:1 is not JSON"),
    Case("report-metrics-record-without-step",
         lambda w: tool("report", run_dir_with_metrics(w, '{"train/loss": 5.0}\n{"step": 1, "train/loss": 5.0}\n'),
                        "--output", "rep"),
         "metrics.jsonl:1 is not a metrics record"),
    # tools/model_stats.py, tools/bench_core.py, tools/bench_l3_gpu.py, tools/bench.py
    Case("model-stats-unknown-override", lambda w: tool("model_stats", "--config", w.config(), "model.d_modle=64"),
         "model.d_modle: unknown key"),
    Case("bench-core-missing-data-prefix",
         lambda w: tool("bench_core", "--data-prefix", "none", "--vocab-size", "512"), "no none.idx"),
    Case("bench-l3-gpu-bad-dtype", lambda w: tool("bench_l3_gpu", "--dtype", "float16"),
         "argument --dtype: invalid choice: 'float16'"),
    # tools/bench.py: a dense model as the L³ one has no exchanges to time at 2 ranks; refused
    # before minutes of training, not after them.
    Case("bench-dense-as-l3", lambda w: tool("bench", "--l3", str(REPO / "configs" / "tiny_dense.yaml"),
                                             "--dense", str(REPO / "configs" / "tiny_dense.yaml"),
                                             "--moe", str(REPO / "configs" / "tiny_moe.yaml"),
                                             "--skip-core", "--output", "report.md"),
         "tiny_dense.yaml has no sharded L³ rows"),
    # launch/sweep.py
    Case("sweep-missing-file", lambda w: sweep("none.yaml", "--dry-run"), "sweep file none.yaml not found"),
    Case("sweep-invalid-yaml", lambda w: sweep(w.write("sweep.yaml", "configs: [a\n"), "--dry-run"),
         "is not valid YAML"),
    Case("sweep-unknown-key", lambda w: sweep(sweep_file(w, {"config": [w.config()]}), "--dry-run"),
         "unknown key 'config'"),
    Case("sweep-bad-grid-key",
         lambda w: sweep(sweep_file(w, {"configs": [w.config()], "grid": {"model.d_modle": [64]}}), "--dry-run"),
         "model.d_modle: unknown key"),
    Case("sweep-study-already-submitted",
         lambda w: sweep(sweep_file(w, {"configs": [w.config()]}), "--study-dir",
                         str(Path(w.write("study/study.json", '{"runs": []}\n')).parent)),
         "study.json exists: that study was already submitted"),
    # launch/local.sh, launch/slurm/pretrain.sbatch (run with bash: the checks come before srun)
    Case("local-sh-bad-nproc", lambda w: launcher("local.sh", "0", w.config()),
         "NPROC must be a positive integer, got '0'"),
    Case("local-sh-missing-config", lambda w: launcher("local.sh", "2", "none.yaml"),
         "config file none.yaml not found"),
    Case("local-sh-missing-arguments", lambda w: launcher("local.sh", "2"),
         "expected NPROC and CONFIG, got 1 argument(s)"),
    Case("sbatch-outside-slurm", lambda w: launcher("slurm/pretrain.sbatch", w.config()),
         "not inside a SLURM job"),
    Case("sbatch-no-arguments", lambda w: launcher("slurm/pretrain.sbatch"), "no CONFIG given"),
    Case("sbatch-unknown-config-key", lambda w: launcher("slurm/pretrain.sbatch", w.config(), "training.bogus=1"),
         "training.bogus: unknown key", env=SLURM_JOB),
    Case("sbatch-unknown-trainer-flag", lambda w: launcher("slurm/pretrain.sbatch", w.config(), "--bogus"),
         "unrecognized arguments: --bogus", env=SLURM_JOB),
]


# ---------------------------------------------------------------------------------------
# The test


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file, link and directory under `root`: files by sha256 and mtime."""
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            state[name] = ("link", os.readlink(path))
        elif path.is_dir():
            state[name] = ("dir",)
        else:
            state[name] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return state


def environment(case: Case, root: Path) -> dict[str, str]:
    """The trainers' test environment, without any launcher's or job's variables of the
    session running the tests (they would change what the entry points check)."""
    env = {key: value for key, value in trainer_env().items()
           if not key.startswith(("SLURM_", "PET_")) and key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["L3TRAIN_PYTHON"] = PY  # the launchers' interpreter: this one, which has l3train
    env.update({key: value.format(root=root) for key, value in case.env.items()})
    return env


def _param(case: Case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
    return pytest.param(case, id=case.id, marks=marks)


def test_case_ids_are_distinct():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 40


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, tiny_corpus, tiny_allocation,
                                                          trained_run):
    command = case.command(Workspace(tmp_path, tiny_corpus, tiny_allocation, trained_run))
    before = snapshot(tmp_path)
    result = subprocess.run(command, cwd=tmp_path, env=environment(case, tmp_path), capture_output=True, text=True,
                            timeout=300)
    after = snapshot(tmp_path)

    shown = f"{' '.join(command)}\nexit status {result.returncode}\nstderr:\n{result.stderr[-4000:]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, shown
    assert lines and lines[-1].startswith("error: ") and case.expect in lines[-1], shown
    if command[0] == "bash":
        assert {line for line in lines if line.startswith("error: ")} == {lines[-1]}, shown
    else:
        assert len(lines) == 1, shown

    changed = sorted(name for name in before if name in after and before[name] != after[name])
    removed = sorted(set(before) - set(after))
    added = sorted(name for name in set(after) - set(before)
                   if not any(fnmatch.fnmatch(name, pattern) for pattern in case.scratch))
    assert not (changed or removed or added), f"changed {changed}, removed {removed}, added {added}\n{shown}"

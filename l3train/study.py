"""The study: an L³ model against its baselines, trained and evaluated in one command.

Four models share the corpus, the tokenizer, the batch, the schedule and the number of
training tokens; each is trained with several seeds (`training.seed` sets both the
initialisation and the data order):

    dense       the iso-FLOP dense model of the L³ config (tools/size_configs.py)
    l3_lzw      the L³ config with the corpus's own LZW allocation (v rows, cap k)
    l3_uniform  the same model with the uniform allocation of the same v (the paper's ablation)
    moe         the iso-sparse MoE: the L³ model's forward FLOPs and total/active ratio

The LZW allocation is scanned from the training part of the corpus only, and the baselines
are sized from the L³ config at that allocation's v and corpus mean d_t. Every finished run
is evaluated on the held-out (valid) documents of the corpus: loss, perplexity and bits per
byte, a multiple-choice continuation task built from the same held-out documents, and for
the L³ models the diagnostics and logit lens (l3train.eval.diagnostics, .logit_lens). The
results go to a markdown report (table of mean ± standard deviation over seeds, plots, and
the exact commands).

The study directory holds everything, so an interrupted study continues where it stopped:

    plan.json              the plan (inputs, v, k, steps); a rerun with another plan is refused
    allocation/            lzw.npz, uniform.npz
    configs/               l3_lzw.yaml, l3_uniform.yaml (written here), dense.yaml, moe.yaml (sized)
    task.jsonl             the multiple-choice task (tools/build_mc_task.py)
    runs/<model>-seed<i>/  run directories
    evaluations/<model>-seed<i>.json   a finished run's evaluation; present = done, skipped on rerun
    logs/                  the output of every command the study ran

Each step is skipped when its output exists; a run whose training stopped part-way
continues from its last checkpoint (`--resume`). More seeds can be added to a finished
study by rerunning it with a larger --seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from l3train.checkpoint.store import checkpoint_root, latest_tag, tag_for_step
from l3train.config import Config, config_from_dict, load_config
from l3train.data.indexed import IndexedDocuments, read_meta
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.run_lock import RunDirLock
from l3train.eval.data import split_range
from l3train.utils.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
MODELS = {"dense": "iso-FLOP dense", "l3_lzw": "L³-LZW", "l3_uniform": "L³-uniform", "moe": "iso-sparse MoE"}
L3_MODELS = ("l3_lzw", "l3_uniform")
PLAN_VERSION = 1
# The first line of a report this module wrote: only such a file is replaced without --overwrite.
REPORT_MARK = "<!-- written by tools/study.py: regenerate it with the command below, do not edit -->"


@dataclass(frozen=True)
class StudySettings:
    """Everything a study depends on; `plan()` is the part its runs depend on."""

    config: str  # the L³ config the study starts from
    data_prefix: str
    tokenizer: str
    corpus: str | None  # raw corpus of the multiple-choice task (None: no task)
    rows: int  # v, rows per L³ layer
    cap: int  # k, rows per token at most
    steps: int  # optimizer steps of every run
    seeds: int
    study_dir: str
    output: str  # the markdown report; its plots go to a folder of the same stem beside it
    mc_examples: int

    def plan(self) -> dict[str, Any]:
        """What the runs depend on: changing any of it would make old and new runs incomparable.
        The number of seeds is not part of it (seeds can be added), nor is the report's path."""
        plan = {key: value for key, value in asdict(self).items() if key not in ("seeds", "study_dir", "output")}
        plan["config_sha256"] = hashlib.sha256(Path(self.config).read_bytes()).hexdigest()
        plan["version"] = PLAN_VERSION
        return plan


def resolve_settings(config: str, data_prefix: str | None, tokenizer: str | None, corpus: str | None,
                     rows: int | None, cap: int | None, steps: int, seeds: int, study_dir: str, output: str,
                     mc_examples: int) -> StudySettings:
    """Fill in the defaults: the data prefix is the config's, the tokenizer and corpus those its
    <prefix>.meta.json names, v and k those of the config's allocation file."""
    cfg = load_config(config)
    if not cfg.l3.after_blocks or cfg.moe.blocks:
        raise L3TrainError(f"{config} must be an L³ config without MoE blocks (l3.after_blocks set, moe.blocks "
                           f"empty): the study sizes its dense and MoE baselines from it")
    if steps < 1 or seeds < 1 or mc_examples < 0:
        raise L3TrainError(f"need --steps >= 1, --seeds >= 1 and --mc-examples >= 0, got {steps}, {seeds}, "
                           f"{mc_examples}")
    if data_prefix is None:
        if len(cfg.data.prefixes) != 1:
            raise L3TrainError(f"{config} blends {len(cfg.data.prefixes)} datasets; pass the study's one "
                               f"--data-prefix")
        data_prefix = cfg.data.prefixes[0]
    meta = read_meta(data_prefix)
    if tokenizer is None:
        # The tokenizer that wrote the data: the config's for its own data, else the one the data's meta names.
        tokenizer = cfg.data.tokenizer if data_prefix in cfg.data.prefixes else meta.get("tokenizer")
    if not tokenizer:
        raise L3TrainError(f"{data_prefix}.meta.json names no tokenizer; pass --tokenizer")
    if corpus is None and meta.get("input") and Path(meta["input"]).is_file():
        corpus = meta["input"]
    if rows is None or cap is None:
        if not Path(cfg.l3.allocation).is_file():
            raise L3TrainError(f"{config}'s allocation {cfg.l3.allocation} is not found to read v and k from; "
                               f"pass --rows and --cap")
        from l3train.allocation.allocation import Allocation

        allocation = Allocation.load(cfg.l3.allocation)
        rows, cap = rows or allocation.budget_v, cap or allocation.cap_k
    return StudySettings(config, data_prefix, tokenizer, corpus if mc_examples else None, rows, cap, steps, seeds,
                         study_dir, output, mc_examples)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _format_spread(values: list[float], digits: int = 4) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def throughput(metrics_path: Path, tokens_per_step: int) -> float:
    """Training tokens per second over the whole run: all logged intervals' tokens over their
    summed time (each interval's time is its tokens over its logged rate)."""
    previous, tokens, seconds = 0, 0.0, 0.0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "train/tokens_per_s" in row:
            interval = (row["step"] - previous) * tokens_per_step
            tokens += interval
            seconds += interval / row["train/tokens_per_s"]
            previous = row["step"]
    return tokens / seconds if seconds else float("nan")


class Study:
    """Prepares, trains, evaluates and reports one study (see the module docstring)."""

    def __init__(self, settings: StudySettings, python: str = sys.executable, progress: bool = True,
                 threads: int | None = None) -> None:
        """`threads`: CPU threads of the training processes and of the evaluation (None: torch's
        default, every core); 1 is much faster on a machine shared with other work."""
        self.settings, self.python, self.progress, self.threads = settings, python, progress, threads
        self.dir = Path(settings.study_dir)
        self.commands: list[tuple[str, list[str]]] = []  # (what, argv) of every preparation step, run or skipped
        self.started = time.monotonic()

    # ---------------------------------------------------------------- paths and names
    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def run_name(self, model: str, seed_index: int) -> str:
        return f"{model}-seed{seed_index}"

    def runs(self) -> list[tuple[str, int]]:
        """(model, seed index) of every run, seeds outermost: a study stopped early has every
        model at the first seeds."""
        return [(model, index) for index in range(self.settings.seeds) for model in MODELS]

    # ---------------------------------------------------------------- commands
    def _tool(self, script: str, *args: str) -> list[str]:
        return [self.python, str(REPO / "tools" / script), *args]

    def _step(self, name: str, what: str, command: list[str], needed: bool) -> None:
        """A preparation step: record `command` for the report, run it when `needed`."""
        self.commands.append((what, command))
        if needed:
            self._execute(name, what, command)

    def _execute(self, name: str, what: str, command: list[str]) -> None:
        """Run `command`, its output in logs/<name>.log; a failure is one line naming the log."""
        log = self.path("logs", f"{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # As launch/quickstart.sh: reuse DeepSpeed's JIT-built CPU op across runs instead of rebuilding it.
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "l3train" / "torch_extensions"))
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(log, "w") as handle:
            status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
        if status != 0:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            raise L3TrainError(f"{what} failed (exit status {status}): {lines[-1] if lines else 'no output'}; "
                               f"full output in {log}; rerun the study to continue")

    # ---------------------------------------------------------------- preparation
    def check_plan(self) -> None:
        """Write plan.json, or refuse a study directory planned with other settings. (Not study.json:
        that is launch/sweep.py's list of runs, which tools/report.py also reads.)"""
        plan, manifest = self.settings.plan(), self.path("plan.json")
        if manifest.is_file():
            previous = json.loads(manifest.read_text())
            changed = [key for key in sorted(set(plan) | set(previous)) if plan.get(key) != previous.get(key)]
            if changed:
                key = changed[0]
                raise L3TrainError(f"{self.dir} holds a study planned with {key}={previous.get(key)!r}, not "
                                   f"{plan.get(key)!r}; its runs would not compare: pass another --study-dir "
                                   f"or delete {self.dir}")
        else:
            atomic_write_text(manifest, json.dumps(plan, indent=2) + "\n")

    def train_tokens(self) -> int:
        """Tokens of the corpus's training part (its documents come first in the dataset)."""
        cfg = load_config(self.settings.config)
        documents = IndexedDocuments(self.settings.data_prefix)
        _, end = split_range(documents.num_documents, cfg.data.split, "train")
        return int(documents.document_starts[end])

    def prepare(self) -> None:
        """Allocations, the four configs and the task; each skipped when it exists."""
        s = self.settings
        lzw, uniform = self.path("allocation", "lzw.npz"), self.path("allocation", "uniform.npz")
        lzw.parent.mkdir(parents=True, exist_ok=True)
        self._step("allocation_lzw", "LZW allocation", self._tool(
            "lzw_allocate.py", "--data-prefix", s.data_prefix, "--tokenizer", s.tokenizer, "--mode", "lzw",
            "--budget", str(s.rows), "--cap", str(s.cap), "--max-tokens", str(self.train_tokens()),
            "--corpus", f"training part of {s.data_prefix}", "--quiet", "--output", str(lzw)), not lzw.is_file())
        self._step("allocation_uniform", "uniform allocation", self._tool(
            "lzw_allocate.py", "--tokenizer", s.tokenizer, "--mode", "uniform", "--budget", str(s.rows),
            "--cap", str(s.cap), "--quiet", "--output", str(uniform)), not uniform.is_file())
        self.write_l3_config("l3_lzw", lzw)
        self.write_l3_config("l3_uniform", uniform)
        dense, moe = self.path("configs", "dense.yaml"), self.path("configs", "moe.yaml")
        self._step("size_configs", "sizing the baselines", self._tool(
            "size_configs.py", "--config", str(self.path("configs", "l3_lzw.yaml")), "--output-dense", str(dense),
            "--output-moe", str(moe), "--overwrite"), not (dense.is_file() and moe.is_file()))
        configs = [load_config(self.path("configs", f"{model}.yaml")) for model in MODELS]
        if len({(cfg.training.global_batch_size, cfg.data.seq_length) for cfg in configs}) != 1:
            raise L3TrainError(f"the study's configs in {self.path('configs')} differ in batch or sequence length: "
                               f"their runs would not see the same tokens")
        task = self.path("task.jsonl")
        if s.corpus is not None:
            self._step("task", "building the multiple-choice task", self._tool(
                "build_mc_task.py", "--corpus", s.corpus, "--split", configs[0].data.split, "--split-part", "valid",
                "--examples", str(s.mc_examples), "--output", str(task)), not task.is_file())

    def write_l3_config(self, model: str, allocation: Path) -> None:
        """The L³ config on the study's data, tokenizer (its vocabulary) and `allocation`."""
        s = self.settings
        tree = yaml.safe_load(Path(s.config).read_text())
        tree["run_dir"] = str(self.path("runs", model))  # each run overrides it with its own
        tree["model"]["vocab_size"] = Tokenizer.load(s.tokenizer).vocab_size
        tree["data"].update(prefixes=[s.data_prefix], weights=None, tokenizer=s.tokenizer)
        tree["l3"]["allocation"] = str(allocation)
        config_from_dict(tree)  # it must load
        header = (f"# {MODELS[model]} model of the study in {self.dir}, written by tools/study.py from {s.config}:\n"
                  f"# its data, tokenizer and allocation ({allocation.name}) replaced by the study's.\n")
        atomic_write_text(self.path("configs", f"{model}.yaml"), header + yaml.safe_dump(tree, sort_keys=False))

    # ---------------------------------------------------------------- runs
    def train_command(self, model: str, seed_index: int) -> list[str]:
        cfg, steps = load_config(self.path("configs", f"{model}.yaml")), self.settings.steps
        overrides = {
            "run_dir": self.path("runs", self.run_name(model, seed_index)),
            "training.seed": cfg.training.seed + seed_index,
            "training.steps": steps,
            # The config's warmup unless the run is too short for it.
            "optimizer.warmup_steps": min(cfg.optimizer.warmup_steps, steps // 10),
            "training.log_interval": max(1, steps // 40),
            "training.eval_interval": max(1, steps // 4),
            # Half a run is lost at most when the study is interrupted; one checkpoint kept per run.
            "checkpoint.save_interval": max(1, steps // 2),
            "checkpoint.keep_last": 1,
        }
        return [self.python, "-m", "l3train.train", "--config", str(self.path("configs", f"{model}.yaml")),
                *(f"{key}={value}" for key, value in overrides.items()), "--resume"]

    def trained(self, run_dir: Path) -> bool:
        root = checkpoint_root(run_dir)
        return (root / "latest").is_file() and latest_tag(root) == tag_for_step(self.settings.steps)

    def evaluate(self, model: str, seed_index: int, run_dir: Path) -> dict[str, Any]:
        """The run's held-out figures, multiple choice, diagnostics and throughput."""
        from l3train.eval.data import indexed_documents
        from l3train.eval.evaluation import diagnose
        from l3train.eval.loading import load_checkpoint_model
        from l3train.eval.multiple_choice import evaluate_multiple_choice, load_task

        start = time.monotonic()
        loaded = load_checkpoint_model(run_dir)
        cfg, tokenizer = loaded.config, loaded.tokenizer()
        text = indexed_documents(self.settings.data_prefix, tokenizer, cfg.data.split, "valid")
        diagnosed = diagnose(loaded.model, text, tokenizer, cfg.data.seq_length, progress=False)
        task = self.path("task.jsonl")
        mc = (evaluate_multiple_choice(loaded.model, tokenizer, load_task(task), progress=False, source=str(task))
              if task.is_file() else None)
        tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
        return {"name": self.run_name(model, seed_index), "model": model, "seed": cfg.training.seed,
                "steps": loaded.step, "tokens": loaded.step * tokens_per_step, "held_out": text.description,
                **diagnosed.record(), "mc": mc.as_dict() if mc else None,
                "tokens_per_s": throughput(run_dir / "metrics.jsonl", tokens_per_step),
                "eval_seconds": time.monotonic() - start}

    def run_all(self) -> None:
        """Train and evaluate every run not done yet, with an estimate of the time left."""
        pending = [(model, index) for model, index in self.runs()
                   if not self.path("evaluations", f"{self.run_name(model, index)}.json").is_file()]
        bar = tqdm(pending, desc="study", unit="run", disable=None if self.progress else True)
        durations: list[float] = []
        for done, (model, index) in enumerate(bar):
            name = self.run_name(model, index)
            run_dir = self.path("runs", name)
            start = time.monotonic()
            discard_unstarted_run(run_dir)
            if not self.trained(run_dir):
                self._execute(f"train_{name}", f"training {name}", self.train_command(model, index))
            result = self.evaluate(model, index, run_dir)
            atomic_write_text(self.path("evaluations", f"{name}.json"), json.dumps(result, indent=2) + "\n")
            durations.append(time.monotonic() - start)
            left = (len(pending) - done - 1) * float(np.mean(durations))
            tqdm.write(f"{name}: held-out loss {result['lm']['loss']:.4f}, bits per byte "
                       f"{result['lm']['bits_per_byte']:.4f} ({durations[-1]:.0f} s; about {left / 60:.0f} min left)")
        bar.close()

    # ---------------------------------------------------------------- report
    def results(self) -> dict[str, list[dict[str, Any]]]:
        """Every run's evaluation, by model."""
        by_model: dict[str, list[dict[str, Any]]] = {model: [] for model in MODELS}
        for model, index in self.runs():
            by_model[model].append(json.loads(self.path("evaluations", f"{self.run_name(model, index)}.json").read_text()))
        return by_model

    def report(self, argv: list[str]) -> Path:
        """The markdown report and its plots, from the evaluations on disk."""
        from l3train.analysis.report import load_run

        output, results = Path(self.settings.output), self.results()
        cache: dict[str, tuple[int, float]] = {}
        runs = {model: load_run(MODELS[model], self.path("runs", self.run_name(model, 0)), cache) for model in MODELS}
        self._plots(results, runs, output.parent / output.stem)
        lines = [REPORT_MARK, "", "# Study: L³ against iso-FLOP dense and iso-sparse MoE baselines", "",
                 *self._setting_lines(results, runs["l3_lzw"].cfg, argv), "",
                 *self._results_table(results, runs), "",
                 f"![held-out loss and bits per byte]({output.stem}/held_out.png)", "",
                 f"![loss vs tokens, seed 0]({output.stem}/loss_vs_tokens.png)", "",
                 *self._diagnostics_section(results, output.stem), "",
                 *self._commands_section()]
        atomic_write_text(output, "\n".join(lines) + "\n")
        return output

    def _plots(self, results: dict[str, list[dict[str, Any]]], runs: dict[str, Any], figures: Path) -> None:
        from l3train.analysis.report import plot_loss_vs_tokens
        from l3train.eval.logit_lens import LensPoint
        from l3train.eval.plots import plot_entropy_vs_rows, plot_logit_lens, plot_model_comparison

        plot_model_comparison({
            "held-out loss (nats/token)": {MODELS[m]: [r["lm"]["loss"] for r in results[m]] for m in MODELS},
            "bits per byte": {MODELS[m]: [r["lm"]["bits_per_byte"] for r in results[m]] for m in MODELS}},
            figures / "held_out.png")
        plot_loss_vs_tokens(list(runs.values()), figures / "loss_vs_tokens.png")
        plot_logit_lens({MODELS[m]: [LensPoint(**p) for p in results[m][0]["logit_lens"]] for m in MODELS},
                        figures / "logit_lens.png")
        plot_entropy_vs_rows({f"{MODELS[m]}, L³ after block {block}": [tuple(row) for row in layer["entropy_by_rows"]]
                              for m in L3_MODELS for block, layer in results[m][0]["l3"].items()},
                             figures / "entropy_vs_rows.png")

    def _setting_lines(self, results: dict[str, list[dict[str, Any]]], cfg: Config, argv: list[str]) -> list[str]:
        s, first = self.settings, results["l3_lzw"][0]
        step_minutes = sum(r["tokens"] / r["tokens_per_s"] for rows in results.values() for r in rows) / 60
        return [
            f"Written by `{shlex.join(['python', 'tools/study.py', *argv])}` on {time.strftime('%Y-%m-%d')} "
            f"({platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch "
            f"{_torch_version()}); this invocation took {(time.monotonic() - self.started) / 60:.1f} min, the "
            f"training steps of all runs {step_minutes:.1f} min (without start-up, validation, checkpoints and "
            f"evaluation).", "",
            f"- **Corpus**: `{s.data_prefix}`, tokenizer `{s.tokenizer}` (vocabulary {cfg.model.vocab_size:,}). "
            f"Held-out: {first['held_out']}, {first['lm']['tokens']:,} tokens, {first['lm']['bytes']:,} bytes.",
            f"- **Training**: every run {s.steps} steps × {cfg.training.global_batch_size} sequences × "
            f"{cfg.data.seq_length} tokens = {first['tokens']:,} tokens ({first['tokens'] / self.train_tokens():.2f} "
            f"epochs of the training part); {s.seeds} seed(s) per model (`training.seed` {cfg.training.seed}, "
            f"{cfg.training.seed + 1}, …: initialisation and data order).",
            f"- **L³**: layers after blocks {cfg.l3.after_blocks}, v = {s.rows:,} rows, k = {s.cap}; LZW allocation "
            f"from the training part (mean d_t {_mean_rows(self.path('allocation', 'lzw.npz')):.1f} per token "
            f"occurrence), uniform allocation of the same v (d_t = "
            f"{_mean_rows(self.path('allocation', 'uniform.npz')):.1f}). Baselines sized by `tools/size_configs.py` "
            f"from the L³-LZW model.",
            "- Figures are the mean ± sample standard deviation over seeds"
            + (" (one seed: no spread)." if s.seeds == 1 else "."),
        ]

    def _results_table(self, results: dict[str, list[dict[str, Any]]], runs: dict[str, Any]) -> list[str]:
        from l3train.analysis.report import format_count

        lines = ["| model | total params | active params | FLOPs/token (fwd) | sparsity | held-out loss | "
                 "bits per byte | perplexity | MC accuracy | MC accuracy (length-norm.) | training tokens/s |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for model, label in MODELS.items():
            stats, rows = runs[model].stats, results[model]
            mc = [r["mc"] for r in rows if r["mc"]]
            lines.append("| " + " | ".join([
                label, format_count(stats.total_params), format_count(stats.active_params),
                format_count(stats.flops_per_token), f"{stats.sparsity:.2f}×",
                _format_spread([r["lm"]["loss"] for r in rows]), _format_spread([r["lm"]["bits_per_byte"] for r in rows]),
                _format_spread([r["lm"]["perplexity"] for r in rows], 1),
                _format_spread([m["accuracy"] for m in mc], 3) if mc else "–",
                _format_spread([m["accuracy_norm"] for m in mc], 3) if mc else "–",
                _format_spread([r["tokens_per_s"] for r in rows], 0)]) + " |")
        mc = results["l3_lzw"][0]["mc"]
        if mc:
            lines += ["", f"Multiple choice: `{self.path('task.jsonl')}`, {mc['examples']} continuation questions "
                          f"from the held-out documents (chance {mc['chance']:.3f})"
                          + (f", {mc['skipped']} more skipped (a choice longer than the models' context)"
                             if mc["skipped"] else "")
                          + "; the length-normalised accuracy divides each choice's log-likelihood by its UTF-8 bytes."]
        return lines

    def _diagnostics_section(self, results: dict[str, list[dict[str, Any]]], figures: str) -> list[str]:
        lines = ["## L³ diagnostics", "",
                 "On the held-out documents, per L³ layer (mean over seeds): softmax entropy over the token's rows, "
                 "the same as a fraction of log d_t (the entropy of an even spread), the top-1 weight, and the "
                 "fraction of a token's rows that get at least 1% of the weight somewhere (mean over the tokens seen).",
                 "", "| model | layer | entropy (nats) | entropy / log d_t | top-1 weight | rows used |",
                 "|---|---|---:|---:|---:|---:|"]
        for model in L3_MODELS:
            for block in results[model][0]["l3"]:
                layers = [r["l3"][block] for r in results[model]]
                lines.append(f"| {MODELS[model]} | after block {block} | "
                             + " | ".join(_format_spread([layer[key] for layer in layers], 3) for key in (
                                 "entropy_mean", "normalized_entropy_mean", "top1_mean", "rows_used_fraction_mean"))
                             + " |")
        return lines + ["", f"![entropy vs d_t, seed 0]({figures}/entropy_vs_rows.png)", "",
                        "The logit lens (seed 0): KL(final ‖ early exit) after every block and every L³ layer; the "
                        "paper reports drops right after the L³ layers.", "",
                        f"![logit lens]({figures}/logit_lens.png)"]

    def _commands_section(self) -> list[str]:
        s = self.settings
        lines = ["## Commands", "",
                 "Run from the repository root; the study ran each of them (or found its output) in this order. "
                 "Each finished run was then evaluated in-process, as `tools/evaluate.py diagnostics RUN_DIR "
                 f"--data-prefix {s.data_prefix} --split-part valid` and `tools/evaluate.py mc RUN_DIR --task "
                 f"{self.path('task.jsonl')}` do.", "", "```bash"]
        trainings = [(f"training {self.run_name(model, index)}", self.train_command(model, index))
                     for model, index in self.runs()]
        # --threads reaches the commands through the environment.
        prefix = f"OMP_NUM_THREADS={self.threads} " if self.threads else ""
        for what, command in self.commands + trainings:
            lines += [f"# {what}", prefix + _relative_command(command)]
        return lines + ["```"]


def _mean_rows(path: Path) -> float:
    from l3train.allocation.allocation import Allocation

    return Allocation.load(path).mean_rows_per_token_occurrence()


def _torch_version() -> str:
    import torch

    return torch.__version__


def _relative_command(command: list[str]) -> str:
    """`command` with the interpreter and repository paths as a user in the repository root types them."""
    def short(part: str) -> str:
        return os.path.relpath(part) if os.path.isabs(part) and Path(part).is_relative_to(Path.cwd()) else part

    return shlex.join(short(part) for part in command)


def discard_unstarted_run(run_dir: Path) -> None:
    """Remove a run stopped before its first checkpoint (what it logged would mix with the fresh
    start's logs), unless a trainer still holds its lock: then refuse, naming that trainer."""
    if run_dir.exists() and not (checkpoint_root(run_dir) / "latest").is_file():
        with RunDirLock(run_dir):
            shutil.rmtree(run_dir)


def run_study(settings: StudySettings, argv: list[str], progress: bool = True, threads: int | None = None) -> Path:
    """The whole study, holding the study directory's lock (one study per directory); returns
    the report's path."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    study = Study(settings, progress=progress, threads=threads)
    with RunDirLock(study.dir, holder_kind="study"):
        study.check_plan()
        study.prepare()
        study.run_all()
        return study.report(argv)


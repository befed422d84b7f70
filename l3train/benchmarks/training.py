"""Training throughput of whole models side by side: the real trainer, models taking turns.

Every model's ranks stay alive for the whole measurement and the models take turns of a few
steps (l3train.benchmarks.turns says why: a shared machine's speed drifts within seconds).
Each model logs every step to its own metrics.jsonl, as training does; a turn's figures are
the medians over its steps but the first (which finds the caches holding the other model's
data) of what that file logs: tokens/s (in all and per device), model TFLOP/s per device and
MFU (where the run knows the device's peak: a GPU in l3train/trainer/throughput.py's table,
or a `training.peak_tflops=` override), and the peak memory. A model's figure is the median
over turns, and a ratio the median of the per-turn ratios, reported with a distribution-free
95% interval for that median (`median_interval`): on a shared machine one turn's ratio can be
10-20% off, and the interval says how far the median itself can be. A separate profiled run
of the first model gives its step time per phase (`training.profile_steps`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path

from l3train.distributed import free_port
from l3train.errors import L3TrainError

WARMUP_STEPS = 3
PROFILED_STEPS = 25  # steps of the profiled run; those after the warm-up are profiled


def threads_per_rank(nproc: int) -> str:
    """OMP_NUM_THREADS for each of `nproc` local ranks: as set, else the cores split between them."""
    return os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))


def error_line(lines: list[str]) -> str | None:
    """A process's own one-line error (the last `error: ...` line, as run_cli prints it) in its
    output `lines`, without the prefix; None if it printed none."""
    return next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")), None)


def run_local_ranks(module: str, arguments: list[str], nproc: int, what: str) -> None:
    """`python -m module arguments` on `nproc` local ranks (torchrun when more than one), the
    cores split between them (OMP_NUM_THREADS unless set); on failure its stderr's tail is
    printed and one line names `what` failed."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                     "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": threads_per_rank(nproc)}
    result = subprocess.run([*launcher, "-m", module, *arguments], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)  # the cause, for a log
        lines = result.stderr.strip().splitlines() or ["no output"]
        # A rank's own one-line error, not torchrun's summary of the failed children after it.
        raise L3TrainError(f"{what} failed: {error_line(lines) or lines[-1]}")


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of the population `values` were drawn from:
    the order statistics x_(j) and x_(n+1-j) (1-based), with the largest j whose interval covers
    the median with probability >= `confidence` for independent draws from any continuous
    distribution (it does unless at least n+1-j values fall on one side of the median:
    1 - 2·P(Binomial(n, 1/2) <= j-1)). None when even the full range covers it less often
    (n < 6 at 95%)."""
    n, ordered = len(values), sorted(values)

    def coverage(j: int) -> float:
        return 1.0 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n  # exact integers: any n

    if n == 0 or coverage(1) < confidence:
        return None
    j = max(j for j in range(1, (n + 1) // 2 + 1) if coverage(j) >= confidence)
    return ordered[j - 1], ordered[n - j]


def ratio_cell(ratios: list[float]) -> str:
    """A table cell: the median of per-turn `ratios` and its 95% `median_interval`."""
    interval = median_interval(ratios)
    return f"{statistics.median(ratios):.2f}×" + ("" if interval is None else
                                                 f" ({interval[0]:.2f}-{interval[1]:.2f})")


def run_trainer(config: str, nproc: int, run_dir: Path, overrides: list[str]) -> Path:
    """Train `config` on `nproc` local ranks into `run_dir`; returns `run_dir`."""
    run_local_ranks("l3train.train", ["--config", config, f"run_dir={run_dir}", *overrides], nproc,
                    f"benchmark run of {config} on {nproc} rank(s)")
    return run_dir


def tokens_per_second(run_dir: Path) -> float:
    """Median tokens/s of a run's logged steps after the warm-up."""
    return run_figures(run_dir)["tokens_per_s"]


# run_figures' keys: metrics.jsonl's train/<key>; medians over the steps asked for, peak memory the largest.
FIGURES = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "peak_memory_gib")


def run_figures(run_dir: Path, steps: Container[int] | None = None) -> dict[str, float | None]:
    """A run's `FIGURES` from its metrics.jsonl over the logged `steps` (default: those after the
    warm-up); None for one it did not log (mfu without a peak, the other figures in runs of an
    older l3train)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    figures: dict[str, float | None] = {}
    for key in FIGURES:
        values = [row[f"train/{key}"] for row in rows if f"train/{key}" in row
                  and (row["step"] in steps if steps is not None else row["step"] > WARMUP_STEPS)]
        summary = max if key == "peak_memory_gib" else statistics.median
        figures[key] = summary(values) if values else None
    return figures


@dataclass
class Throughput:
    config: str
    nproc: int
    tokens_per_s: list[float] = field(default_factory=list)  # one median per turn
    runs: list[dict[str, float | None]] = field(default_factory=list)  # run_figures of each turn

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    def figure(self, key: str) -> float | None:
        """The median over turns of one of `FIGURES` (None where a run did not log it)."""
        values = [run[key] for run in self.runs]
        return None if not values or None in values else statistics.median(values)


def measure_throughput(configs: list[str], nproc: int, steps_per_turn: int, turns: int, overrides: list[str],
                       log: Callable[[str], None] = print) -> list[Throughput]:
    """Tokens/s (and the other `FIGURES`) of each config on `nproc` ranks: after `WARMUP_STEPS`
    each, the models take `turns` turns of `steps_per_turn` steps (A B C A B C ...)."""
    from l3train.benchmarks.turns import ModelRanks

    if steps_per_turn < 2 or turns < 1:
        raise L3TrainError(f"steps per turn (--steps) must be >= 2, the first of a turn not being counted, and "
                           f"turns (--turns) >= 1; got {steps_per_turn} and {turns}")
    results = [Throughput(config, nproc) for config in configs]
    total = WARMUP_STEPS + turns * steps_per_turn
    common = [f"training.steps={total}", "training.log_interval=1", "optimizer.warmup_steps=1", *overrides]
    with tempfile.TemporaryDirectory(prefix="l3train-bench-") as scratch, contextlib.ExitStack() as stack:
        models = [stack.enter_context(ModelRanks(config, nproc, Path(scratch) / f"m{index}", common, Path(scratch)))
                  for index, config in enumerate(configs)]
        for model in models:  # all start together; each is built before any trains
            model.wait_for("ready")
        for model in models:
            model.train(WARMUP_STEPS)
        for turn in range(turns):
            for model in models:
                model.train(steps_per_turn)
            log(f"  {nproc} rank(s), turn {turn + 1}/{turns} done")
        for model in models:
            model.close()
        for result, model in zip(results, models):
            for turn in range(turns):
                first = WARMUP_STEPS + turn * steps_per_turn + 1  # the turn's first step, as logged
                result.runs.append(run_figures(model.run_dir, range(first + 1, first + steps_per_turn)))
                result.tokens_per_s.append(result.runs[-1]["tokens_per_s"])
    return results


def profile_phases(config: str, nproc: int, steps: int, overrides: list[str]) -> tuple[dict[str, float], list[str]]:
    """Host milliseconds per step of each phase on rank 0 (`training.profile_steps`), and with
    several ranks the report of the steps' collectives (l3train.trainer.collective_trace)."""
    first = WARMUP_STEPS + 1
    with tempfile.TemporaryDirectory(prefix="l3train-bench-") as scratch:
        run_dir = Path(scratch) / "profiled"
        run_trainer(config, nproc, run_dir, [f"training.steps={steps}", f"training.eval_interval={steps + 1}",
                                        f"checkpoint.save_interval={steps + 1}", "optimizer.warmup_steps=1",
                                        f"training.profile_steps=[{first},{steps}]", *overrides])
        phases = json.loads((run_dir / "profile" / "phases_rank00000.json").read_text())["ms_per_step"]
        waits = run_dir / "profile" / "collectives.md"
        return ({name: times["host"] for name, times in phases.items()},
                waits.read_text().splitlines() if waits.is_file() else [])


THROUGHPUT_HEADER = ["| ranks | L³ tok/s | dense tok/s | MoE tok/s | L³ ÷ dense (95% interval) | "
                     "L³ ÷ MoE (95% interval) |", "|---|---|---|---|---|---|"]
UNITS_HEADER = ["| ranks | model | tok/s/device | TFLOP/s/device | MFU | peak memory (GiB) |",
                "|---|---|---|---|---|---|"]


def units_rows(nproc: int, models: dict[str, Throughput]) -> list[str]:
    """Markdown rows (under `UNITS_HEADER`) of each model's figures in peers' units: medians over
    the turns; "n/a" for a figure the runs did not log (MFU without a known peak)."""

    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return [f"| {nproc} | {name} | {cell(result.figure('tokens_per_s_per_device'), ',.0f')} | "
            f"{cell(result.figure('tflops_per_device'), '.3g')} | {cell(result.figure('mfu'), '.1%')} | "
            f"{cell(result.figure('peak_memory_gib'), '.2f')} |" for name, result in models.items()]


# Everything from this line on in the report is kept when tools/bench.py rewrites it: sections
# written by hand or by other tools (tools/bench_data.py's figures, profiles).
KEEP_MARKER = "<!-- the sections below are not written by tools/bench.py: it keeps them -->"


def report_text(machine_line: str, args, table: list[str], units: list[str], nproc: int,
                phases: dict[str, float], waits: list[str], exchanges: list[str], core: list[str]) -> str:
    """tools/bench.py's markdown report (`args`: its parsed arguments; `waits`: the profiled
    steps' collectives, and `exchanges`: the lines of l3train.benchmarks.exchange.report_lines,
    both empty at one rank)."""
    report = [
        "# Benchmarks", "",
        "Written by `tools/bench.py`; every figure of one table was measured in the same run: every",
        "model's ranks alive throughout, the models taking turns of a few steps (A B C A B C ...) after",
        "3 warm-up steps each; a turn's figure is the median over its steps but the first, a model's the",
        "median over its turns, a ratio the median of the per-turn ratios, with a distribution-free 95%",
        "interval for that median in brackets (the order statistics that cover it: l3train.benchmarks.",
        "training.median_interval; none with fewer than 6 turns).", "",
        f"Machine: {machine_line}.", f"Settings: {args.turns} turns of {args.steps} steps per model; "
        f"models {args.l3}, {args.dense}, {args.moe}"
        + (f"; overrides {' '.join(args.overrides)}." if args.overrides else "."), "",
        "## Training throughput", "", *table, "",
        "In peers' units (per device = per rank; model FLOPs as torchtitan and Megatron-LM count them,",
        "l3train.sizing.accounting.TrainingFlops; MFU n/a without a known device peak; peak memory the",
        "largest rank's: CUDA allocator peak on a GPU, the process's peak resident set on CPU):", "",
        *units, "",
        f"## L³ step time per phase ({nproc} rank(s), rank 0, host ms per step, profiled)", "",
        "| " + " | ".join(phases) + " |", "|" + "---|" * len(phases),
        "| " + " | ".join(f"{ms:.1f}" for ms in phases.values()) + " |", "",
        "`all_to_all` is part of forward and backward.", "",
    ]
    if waits:
        report += [f"## Where the profiled L³ steps wait ({nproc} ranks: l3train.trainer.collective_trace)", "",
                   "A collective's transfer is the least time any rank of its group spent in it (the last to",
                   "arrive); the rest of a rank's time in it is waiting for a later rank.", "", *waits, ""]
    if exchanges:
        report += [f"## The sharded rows' exchanges ({nproc} ranks, {args.l3}'s sizes, rank 0)", "", *exchanges, ""]
    if core:
        report += ["## Core library", "", "```", *core, "```", ""]
    return "\n".join(report)


def write_report(path: Path, text: str) -> None:
    """Write `text` to `path`, keeping the existing report's part from `KEEP_MARKER` on."""
    from l3train.utils.atomic import atomic_write_text

    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, text + ("\n" + old[old.index(KEEP_MARKER):] if KEEP_MARKER in old else ""))

"""Compare training runs: a markdown table and loss plots from what the trainer wrote.

Studies compare dense and L³ models at matched active parameters, so the table puts the
parameter and FLOP accounting (l3train/sizing/accounting.py) next to the losses: run,
family (dense, L³, MoE or L³+MoE, from l3.after_blocks and moe.blocks), total and active
parameters, forward FLOPs per token, tokens seen, final train loss, final and best
validation loss. Two plots: loss against tokens for every run (train lines, validation
markers), and final validation loss against active parameters: every run as a point, and
per family a line through the best run of each size.

Inputs are read, never written: each run's config.yaml and metrics.jsonl, and for L³ runs
the allocation file the config names (its mean rows per token occurrence sets the active
parameters; relative paths resolve from the current directory, as in training). Figures
are drawn without pyplot, so writing a report never touches the global plotting backend.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from l3train.config import Config, load_config
from l3train.errors import L3TrainError
from l3train.sizing.accounting import ModelStats, model_stats
from l3train.utils.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FAMILIES = {(False, False): "dense", (True, False): "L³", (False, True): "MoE", (True, True): "L³+MoE"}
FAMILY_MARKERS = {"dense": "s", "L³": "o", "MoE": "^", "L³+MoE": "D"}


@dataclass(frozen=True)
class Run:
    """One training run as the report sees it: its config, sizes and logged losses."""

    name: str
    path: Path
    cfg: Config
    stats: ModelStats
    train_loss: dict[int, float]  # step -> loss
    val_loss: dict[int, float]

    @property
    def family(self) -> str:
        return FAMILIES[bool(self.cfg.l3.after_blocks), bool(self.cfg.moe.blocks)]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.training.global_batch_size * self.cfg.data.seq_length

    @property
    def final_val(self) -> float | None:
        return self.val_loss[max(self.val_loss)] if self.val_loss else None


def read_metrics(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train/loss, val/loss) by step; a half-written last line of a live run is ignored."""
    train, val = {}, {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise L3TrainError(f"{path}:{number} is not JSON; the metrics file is corrupt") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            # The trainer writes one {"step": N, ...} object per line; anything else is damage.
            raise L3TrainError(f"{path}:{number} is not a metrics record (a JSON object with an integer "
                               f"\"step\"); the metrics file is corrupt")
        if "train/loss" in row:
            train[row["step"]] = row["train/loss"]
        if "val/loss" in row:
            val[row["step"]] = row["val/loss"]
    return train, val


def allocation_figures(cfg: Config, run_dir: Path, cache: dict[str, tuple[int, float]]) -> tuple[int, float]:
    """(rows v, corpus mean d_t) of the run's L³ allocation."""
    from l3train.allocation.allocation import Allocation

    if cfg.l3.allocation not in cache:
        if not Path(cfg.l3.allocation).is_file():
            raise L3TrainError(f"run {run_dir}: its L³ allocation {cfg.l3.allocation} is not found (needed for "
                               f"active parameters); run the report from the directory the run trained in")
        allocation = Allocation.load(cfg.l3.allocation, expect_vocab_size=cfg.model.vocab_size)
        cache[cfg.l3.allocation] = (int(allocation.rows_per_token.sum()),
                                    allocation.mean_rows_per_token_occurrence())
    return cache[cfg.l3.allocation]


def load_run(name: str, run_dir: Path, cache: dict[str, tuple[int, float]]) -> Run:
    if not run_dir.is_dir():
        raise L3TrainError(f"run directory {run_dir} not found")
    if not (run_dir / "config.yaml").is_file():
        raise L3TrainError(f"{run_dir} has no config.yaml: not a run directory (or the run has not started), nor a "
                           f"study directory (launch/sweep.py's study.json, or tools/study.py's plan.json)")
    metrics_path = run_dir / "metrics.jsonl"
    train, val = read_metrics(metrics_path) if metrics_path.is_file() else ({}, {})
    if not train:
        raise L3TrainError(f"run {run_dir} has not logged a training step yet ({metrics_path} is missing or "
                           f"has no train/loss)")
    cfg = load_config(run_dir / "config.yaml")
    rows, mean_rows = allocation_figures(cfg, run_dir, cache) if cfg.l3.after_blocks else (0, 0.0)
    stats = model_stats(cfg.model, cfg.l3, cfg.data.seq_length, rows, mean_rows, cfg.moe)
    return Run(name, run_dir, cfg, stats, train, val)


def _study_runs(path: Path) -> list[tuple[str, Path]] | None:
    """(name, run_dir) of the runs of a study directory: launch/sweep.py's lists them in its
    study.json, tools/study.py's (plan.json) holds them under runs/. None: not a study directory."""
    manifest = path / "study.json"
    if manifest.is_file():
        try:
            return [(entry["name"], Path(entry["run_dir"])) for entry in json.loads(manifest.read_text())["runs"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise L3TrainError(f"{manifest} is not a study manifest written by launch/sweep.py") from None
    if (path / "plan.json").is_file() and (path / "runs").is_dir():
        return [(run_dir.name, run_dir) for run_dir in sorted((path / "runs").iterdir()) if run_dir.is_dir()]
    return None


def collect_runs(paths: list[Path]) -> list[Run]:
    """Runs of study directories (launch/sweep.py's or tools/study.py's) and of run directories,
    in the order given."""
    cache: dict[str, tuple[int, float]] = {}
    runs = []
    for path in paths:
        members = _study_runs(path)
        if members is None:
            runs.append(load_run(path.name, path, cache))
            continue
        for name, run_dir in members:
            try:
                runs.append(load_run(name, run_dir, cache))
            except L3TrainError as err:
                print(f"warning: skipping {name} of study {path}: {err}", file=sys.stderr)
    if not runs:
        raise L3TrainError(f"no run with logged training steps in {', '.join(map(str, paths))}")
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # e.g. two studies with the same run names
        runs = [Run(f"{run.path.parent.name}/{run.name}", run.path, run.cfg, run.stats, run.train_loss,
                    run.val_loss) for run in runs]
    return runs


def format_count(value: float) -> str:
    """4 significant digits with a K/M/B/T suffix: 423,168 -> 423.2K."""
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= divisor:
            return f"{value / divisor:.4g}{suffix}"
    return f"{value:.4g}"


def format_loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def markdown(runs: list[Run]) -> str:
    header = ["run", "family", "total params", "active params", "FLOPs/token (fwd)", "tokens seen",
              "final train loss", "final val loss", "best val loss"]
    lines = ["# Training report", "",
             f"{len(runs)} run(s). Active parameters count one token's L³ rows at the corpus mean rows per "
             "token occurrence; FLOPs are forward matmul FLOPs per token (l3train/sizing/accounting.py).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for run in runs:
        last = max(run.train_loss)
        cells = [run.name, run.family, format_count(run.stats.total_params), format_count(run.stats.active_params),
                 format_count(run.stats.flops_per_token), format_count(last * run.tokens_per_step),
                 format_loss(run.train_loss[last]), format_loss(run.final_val),
                 format_loss(min(run.val_loss.values()) if run.val_loss else None)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![loss vs tokens](loss_vs_tokens.png)", "",
              "![final validation loss vs active parameters](val_loss_vs_active_params.png)", ""]
    return "\n".join(lines)


def figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    """A figure with one axes, detached from pyplot (no global backend or figure registry);
    matplotlib is imported only when a report is drawn."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots()


def save_figure(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG at `path`, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_loss_vs_tokens(runs: list[Run], path: Path) -> None:
    """Train loss lines and validation markers against tokens seen, one color per run."""
    fig, ax = figure((8, 5))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        steps = sorted(run.train_loss)
        ax.plot([s * run.tokens_per_step for s in steps], [run.train_loss[s] for s in steps], color=color,
                label=f"{run.name} (train)")
        if run.val_loss:
            steps = sorted(run.val_loss)
            ax.plot([s * run.tokens_per_step for s in steps], [run.val_loss[s] for s in steps], "o--",
                    color=color, markersize=4, label=f"{run.name} (val)")
    ax.set(xlabel="tokens seen", ylabel="loss", title="Loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_val_vs_active(runs: list[Run], path: Path) -> None:
    """Every run as a point; per family, a line through the best run at each model size
    (runs at one size differ in hyperparameters, e.g. a learning-rate sweep)."""
    fig, ax = figure((7, 5))
    for index, (family, marker) in enumerate(FAMILY_MARKERS.items()):
        members = [run for run in runs if run.family == family and run.final_val is not None]
        if not members:
            continue
        color = f"C{index}"
        ax.scatter([run.stats.active_params for run in members], [run.final_val for run in members],
                   marker=marker, color=color, alpha=0.35)
        best: dict[float, Run] = {}
        for run in members:
            size = run.stats.active_params
            if size not in best or run.final_val < best[size].final_val:
                best[size] = run
        sizes = sorted(best)
        ax.plot(sizes, [best[size].final_val for size in sizes], marker=marker, color=color,
                label=f"{family} (best per size)")
        for size in sizes:
            ax.annotate(best[size].name, (size, best[size].final_val), textcoords="offset points",
                        xytext=(4, 4), fontsize="x-small")
    if ax.lines:
        ax.set_xscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no run has a validation loss yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="active parameters", ylabel="final validation loss", title="Final validation loss vs active parameters")
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def report_files(output: Path) -> tuple[Path, Path, Path]:
    """The files `write_report` writes into `output`: report.md and the two plots."""
    return output / "report.md", output / "loss_vs_tokens.png", output / "val_loss_vs_active_params.png"


def write_report(runs: list[Run], output: Path) -> Run | None:
    """Write report.md and the two plots into `output`; return the run with the best final
    validation loss (None if no run has one yet)."""
    report, loss_plot, val_plot = report_files(output)
    output.mkdir(parents=True, exist_ok=True)
    plot_loss_vs_tokens(runs, loss_plot)
    plot_val_vs_active(runs, val_plot)
    atomic_write_text(report, markdown(runs))
    return min((run for run in runs if run.final_val is not None), key=lambda run: run.final_val, default=None)

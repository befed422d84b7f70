"""PNG plots and TensorBoard scalars of evaluation results.

Figures are drawn like the run reports' (l3train.analysis.report): without pyplot, written
atomically. Each plot overlays series (the L³ layers of one model, or the models of a study)
so one figure answers one question.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from l3train.analysis.report import figure, save_figure
from l3train.eval.diagnostics import ROW_THRESHOLD, LayerDiagnostics
from l3train.eval.logit_lens import LensPoint

# One series of the entropy-vs-d_t plot: (d_t, positions, mean entropy) rows.
RowsSeries = list[tuple[int, int, float]]


def plot_histograms(layers: dict[int, LayerDiagnostics], path: Path) -> None:
    """Three panels side by side: softmax entropy, top-1 weight and used-row fraction, one step
    histogram per L³ layer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for layer in layers.values():
        label = f"L³ after block {layer.block}"
        _, fractions = layer.rows_used_fraction()
        axes[0].hist(layer.entropy, bins=50, histtype="step", density=True, label=label)
        axes[1].hist(layer.top1, bins=np.linspace(0, 1, 51), histtype="step", density=True, label=label)
        axes[2].hist(fractions, bins=np.linspace(0, 1, 26), histtype="step", density=True, label=label)
    axes[0].set(xlabel="softmax entropy (nats)", ylabel="density", title="Entropy per position")
    axes[1].set(xlabel="top-1 weight", title="Top-1 weight per position")
    axes[2].set(xlabel=f"fraction of the token's rows with ≥ {ROW_THRESHOLD:.0%} weight somewhere",
                title="Rows used per token (tokens seen)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_entropy_vs_rows(series: dict[str, RowsSeries], path: Path) -> None:
    """Mean softmax entropy against d_t per series (marker area ∝ positions), with log d_t,
    the entropy of an even spread, for reference."""
    fig, ax = figure((7, 5))
    largest = 1
    for index, (label, rows) in enumerate(series.items()):
        if not rows:
            continue
        d_t, counts, entropy = (np.array(column) for column in zip(*rows))
        sizes = 8 + 120 * counts / counts.max()
        ax.scatter(d_t, entropy, s=sizes, alpha=0.5, color=f"C{index}", label=label)
        largest = max(largest, int(d_t.max()))
    reference = np.arange(1, largest + 1)
    ax.plot(reference, np.log(reference), "k--", linewidth=1, label="log d_t (even spread)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rows of the token d_t", ylabel="mean softmax entropy (nats)", title="Entropy vs d_t")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_logit_lens(curves: dict[str, list[LensPoint]], path: Path) -> None:
    """KL(final ‖ early exit) along the depth, one line per model; L³ points are stars. One
    model: a tick per read-out point; several (of different depths): x is the fraction of
    each model's read-out points."""
    fig, ax = figure((8, 5))
    single = len(curves) == 1
    for index, (label, points) in enumerate(curves.items()):
        color = f"C{index}"
        depth = np.arange(len(points)) / (1 if single else max(len(points) - 1, 1))
        ax.plot(depth, [point.kl for point in points], "o-", color=color, markersize=3, label=label)
        lookups = [i for i, point in enumerate(points) if point.after_l3]
        ax.plot(depth[lookups], [points[i].kl for i in lookups], "*", color=color, markersize=12)
    if single:
        points = next(iter(curves.values()))
        ax.set_xticks(range(len(points)), [point.name for point in points], rotation=45, ha="right",
                      fontsize="small")
    else:
        ax.set_xlabel("depth (fraction of the model's read-out points: blocks and L³ layers)")
    positive = [point.kl for points in curves.values() for point in points if point.kl > 0]
    if positive:
        # Logarithmic down to the smallest positive KL, linear below it to the last point's 0.
        ax.set_yscale("symlog", linthresh=max(min(positive), 1e-6))
    ax.set_ylim(bottom=0)
    ax.set(ylabel="KL(final ‖ early exit), nats", title="Logit lens (stars: right after an L³ layer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def write_tensorboard(log_dir: Path, step: int, scalars: dict[str, float],
                      histograms: dict[str, np.ndarray] | None = None) -> None:
    """Add `scalars` (and `histograms`) at `step` to the TensorBoard events under `log_dir`."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for name, value in scalars.items():
            if math.isfinite(value):
                writer.add_scalar(name, value, step)
        for name, values in (histograms or {}).items():
            if len(values):
                writer.add_histogram(name, values, step)
    finally:
        writer.close()


def plot_model_comparison(panels: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One panel per metric (e.g. held-out loss, bits per byte): per model a bar at the mean
    over seeds, an error bar of their standard deviation and each seed as a dot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(panels), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (metric, by_model) in zip(axes, panels.items()):
        labels = list(by_model)
        means = [float(np.mean(by_model[label])) for label in labels]
        spreads = [float(np.std(by_model[label], ddof=1)) if len(by_model[label]) > 1 else 0.0 for label in labels]
        ax.bar(range(len(labels)), means, yerr=spreads, capsize=6, color=[f"C{i}" for i in range(len(labels))],
               alpha=0.6)
        for index, label in enumerate(labels):
            ax.plot([index] * len(by_model[label]), by_model[label], "k.", markersize=6)
        low = min(min(values) for values in by_model.values())
        high = max(max(values) for values in by_model.values())
        # Zoom on the differences: the bars' common base is far below them.
        ax.set_ylim(low - 0.3 * (high - low + 1e-3), high + 0.3 * (high - low + 1e-3))
        ax.set_xticks(range(len(labels)), labels)
        ax.set(ylabel=metric, title=f"{metric} (mean ± std over seeds; dots: seeds)")
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)

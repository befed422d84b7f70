"""Generation speed and memory of the table placements, side by side (tools/bench_inference.py).

Speed: one process loads the model once per variant (`variants`: on a CPU resident, host,
disk, and disk staged with and without prefetch), then generates with all of them at once,
one decoding step of each in turn (in a new random order every step), so that the machine's load drifts hit
every variant alike; this is repeated `reps` times. Every variant draws the same tokens
(sampling from a seed; the logits are bit-identical across placements), so they do the
same work. Reported: decode tokens/s (after the prefill), the median over repetitions,
each variant's speed relative to resident as the median of the per-repetition ratios,
and the staging counters.

Memory: a fresh child process per placement loads the model and generates; its peak
resident set (VmHWM, reset after the imports) minus its resident set at that point is
what loading and generating cost. That includes ~150 MB that loading any model adds on
this machine (libraries' code pages, modules, allocator pools: the disk placement's
"after load"), so it is measured on the model with large tables only. The disk tables are written before, so the disk
child measures steady use, not the one-time write.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import torch

from l3train.benchmarks.core import resident_kb
from l3train.checkpoint.consolidated import ConsolidatedContents, plain_state_dict, write_consolidated
from l3train.checkpoint.reader import open_checkpoint
from l3train.config import load_config
from l3train.inference.config import InferenceConfig
from l3train.inference.engine import Generator
from l3train.inference.loading import load_for_generation

def variants(device: torch.device) -> dict[str, dict[str, Any]]:
    """The placements timed on `device`, by name: InferenceConfig options. A CPU model computes
    on host and disk tables in place (disk: memory-mapped; prefetch does not apply), and its
    staged path, what a GPU model takes, is timed too; a CUDA model's host and disk rows are
    always staged, with or without prefetch."""
    if device.type == "cpu":
        return {"resident": {"placement": "resident"}, "host": {"placement": "host"},
                "disk": {"placement": "disk"}, "disk, staged": {"placement": "disk", "in_place": False},
                "disk, staged, no prefetch": {"placement": "disk", "in_place": False, "prefetch": False}}
    return {"resident": {"placement": "resident"}, "host": {"placement": "host"},
            "host, no prefetch": {"placement": "host", "prefetch": False}, "disk": {"placement": "disk"},
            "disk, no prefetch": {"placement": "disk", "prefetch": False}}


MEMORY_PLACEMENTS = ("resident", "host", "disk")


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark: a config's shape with random weights, optionally a uniform allocation."""

    name: str
    config: str
    uniform_rows_per_token: int | None = None  # None: the config's allocation
    measure_memory: bool = False  # worth it only when the tables dwarf what loading any model adds


def prepare_checkpoint(model: BenchModel, work_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The consolidated checkpoint of `model` with random weights under `work_dir` (made once)."""
    from l3train.allocation.allocation import Allocation, uniform_allocation
    from l3train.data.tokenizer import Tokenizer
    from l3train.model.build import build_model

    output = work_dir / model.name / "consolidated"
    if output.is_dir():
        return output
    overrides = [f"run_dir={work_dir / model.name}"]
    if model.uniform_rows_per_token:
        cfg = load_config(model.config)
        vocab, rows = cfg.model.vocab_size, model.uniform_rows_per_token
        allocation = work_dir / model.name / f"uniform_{rows}.npz"
        Allocation(uniform_allocation(vocab, vocab * rows, rows), np.zeros(vocab, dtype=np.int64), vocab,
                   vocab * rows, rows, "uniform", Tokenizer.load(cfg.data.tokenizer).tokenizer_id,
                   "bench_inference", 0).save(allocation)
        overrides.append(f"l3.allocation={allocation}")
    cfg = load_config(model.config, overrides)
    log(f"writing {output} (random weights)")
    built, _ = build_model(cfg)
    write_consolidated(output, ConsolidatedContents(cfg, 0, {"kind": "bench_inference"}),
                       plain_state_dict(built, cfg.model.tie_embeddings).items())
    return output


def table_bytes(checkpoint: Path) -> int:
    """Bytes of all L³ tables of the checkpoint."""
    from l3train.checkpoint.consolidated import Consolidated

    return sum(int(np.prod(shape)) * 4 for name, shape in Consolidated(checkpoint, check=False).shapes().items()
               if ".rows." in name)


def bench_prompts(batch: int, vocab_size: int) -> list[list[int]]:
    """Seeded random prompts of 8 to 16 tokens (different lengths: the batch is padded)."""
    rng = np.random.default_rng(batch)
    return [rng.integers(0, vocab_size, rng.integers(8, 17)).tolist() for _ in range(batch)]


def _counters(generator: Generator) -> dict[str, float]:
    counters = generator.placement.counters
    return {field.name: getattr(counters, field.name) for field in dataclasses.fields(counters)}


def _interleaved_decode(generators: dict[str, Generator], prompts: list[list[int]], sampling: InferenceConfig,
                        order: random.Random) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Generate with every variant at once, one decoding step of each in turn (in a new
    random order every step: no variant always follows the same one), so that load changes
    on this machine slower than a step hit all variants alike. Returns each variant's decode
    tokens/s (the prefill is not timed) and its counters over the decode steps: the staging
    counters, and `cpu_s`, the CPU time of the thread running the model (unlike wall time,
    it does not count the time other processes take the core)."""
    names = list(generators)
    streams = {name: generator.stream(prompts, sampling) for name, generator in generators.items()}
    for stream in streams.values():
        next(stream)  # the prefill
    before = {name: _counters(generator) for name, generator in generators.items()}
    seconds, cpu_seconds = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for _ in range(sampling.max_new_tokens - 1):
        for name in order.sample(names, len(names)):
            start, cpu_start = time.perf_counter(), time.thread_time()
            next(streams[name])
            seconds[name] += time.perf_counter() - start
            cpu_seconds[name] += time.thread_time() - cpu_start
    speeds = {name: len(prompts) * (sampling.max_new_tokens - 1) / seconds[name] for name in names}
    counters = {name: {**{key: value - before[name][key] for key, value in _counters(generators[name]).items()},
                       "cpu_s": cpu_seconds[name], "wall_s": seconds[name]} for name in names}
    return speeds, counters


def _warm_page_cache(table_dir: Path) -> None:
    """Read the table files once (plain reads: nothing is mapped into this process)."""
    for path in table_dir.glob("*.npy"):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def bench_speed(checkpoint: Path, table_dir: Path, batches: list[int], reps: int, new_tokens: int,
                log: Callable[[str], None] = print, device: torch.device = torch.device("cpu")) -> list[dict[str, Any]]:
    """Interleaved decode timings of every variant, per batch size, on `device` (on CUDA the
    host and disk placements stage rows through a pinned buffer)."""
    reader = open_checkpoint(checkpoint, verify=False)
    timed = variants(device)
    generators = {}
    for variant, options in timed.items():
        model, placement = load_for_generation(reader, InferenceConfig(**options, table_dir=str(table_dir)), device)
        generators[variant] = Generator(model, placement)
    _warm_page_cache(table_dir)
    names = list(timed)
    results = []
    for batch in batches:
        prompts = bench_prompts(batch, reader.config.model.vocab_size)
        sampling = InferenceConfig(max_new_tokens=new_tokens, temperature=1.0, seed=0)
        order = random.Random(batch)
        _interleaved_decode(generators, prompts, sampling, order)  # warm-up: allocator, thread, page cache
        speeds: dict[str, list[float]] = {name: [] for name in names}
        counters: dict[str, dict[str, float]] = {name: {} for name in names}
        for rep in range(reps):
            rep_speeds, rep_counters = _interleaved_decode(generators, prompts, sampling, order)
            for name in names:
                speeds[name].append(rep_speeds[name])
                for key, value in rep_counters[name].items():
                    counters[name][key] = counters[name].get(key, 0) + value
        for name in names:
            total = counters[name]
            decode_steps = reps * (new_tokens - 1)
            row = {"batch": batch, "variant": name, "tokens_per_s": statistics.median(speeds[name]),
                   "tokens_per_s_reps": speeds[name],
                   "vs_resident": statistics.median(s / r for s, r in zip(speeds[name], speeds["resident"])),
                   "bytes_per_token": total["bytes_moved"] / max(total["tokens"], 1),
                   "stalls_per_lookup": total["stalls"] / max(total["lookups"], 1),
                   "wait_ms_per_step": 1e3 * total["wait_s"] / decode_steps, "extra_chunks": total["extra_chunks"],
                   "wall_ms_per_step": 1e3 * total["wall_s"] / decode_steps,
                   "cpu_ms_per_step": 1e3 * total["cpu_s"] / decode_steps}
            # Where a step's time goes: the model's thread runs (CPU time; without prefetch this
            # includes staging the rows, the wait), is blocked on the prefetch (the wait, with
            # prefetch), or neither although it could run: other processes hold the core, or the
            # prefetch thread holds the GIL (off-CPU).
            blocked = row["wait_ms_per_step"] if timed[name].get("prefetch", True) else 0.0
            row["off_cpu_ms_per_step"] = row["wall_ms_per_step"] - row["cpu_ms_per_step"] - blocked
            results.append(row)
            log(f"  batch {batch:>2}  {name:<26} {row['tokens_per_s']:8.1f} tok/s"
                f"  {row['vs_resident']:5.2f}x resident"
                f"  {row['bytes_per_token'] / 1024:7.1f} KiB/token  stalls/lookup {row['stalls_per_lookup']:.2f}"
                f"  ms/step: wall {row['wall_ms_per_step']:.2f}, CPU {row['cpu_ms_per_step']:.2f},"
                f" wait {row['wait_ms_per_step']:.2f}, off-CPU {row['off_cpu_ms_per_step']:.2f}")
    for generator in generators.values():
        generator.placement.close()
    return results


def _memory_child(checkpoint: Path, placement: str, table_dir: Path, batch: int, new_tokens: int, threads: int,
                  queue: mp.Queue) -> None:
    """In a fresh process: MB of resident memory that loading and generating add, at the peak and at the end."""
    torch.set_num_threads(threads)
    baseline_kb = resident_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
    reader = open_checkpoint(checkpoint, verify=False)
    model, tables = load_for_generation(reader, InferenceConfig(placement=placement, table_dir=str(table_dir)),
                                       torch.device("cpu"))
    loaded_kb = resident_kb("VmRSS")
    Generator(model, tables).generate(bench_prompts(batch, reader.config.model.vocab_size),
                                      InferenceConfig(max_new_tokens=new_tokens, temperature=1.0, seed=0))
    queue.put({"placement": placement, "peak_mb": (resident_kb("VmHWM") - baseline_kb) / 1024,
               "after_load_mb": (loaded_kb - baseline_kb) / 1024, "end_mb": (resident_kb("VmRSS") - baseline_kb) / 1024})


def _result_of(child: mp.Process, queue: mp.Queue) -> dict[str, Any]:
    """What `child` puts on `queue`; an error if it dies first (rather than waiting forever)."""
    while True:
        try:
            return queue.get(timeout=1)
        except Empty:
            if not child.is_alive():
                raise RuntimeError(f"the memory measurement process exited with status {child.exitcode}") from None


def bench_memory(checkpoint: Path, table_dir: Path, batch: int, new_tokens: int, threads: int,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Resident memory that loading and generating add, per placement, each in a fresh process."""
    context = mp.get_context("spawn")
    results = []
    for placement in MEMORY_PLACEMENTS:
        queue = context.Queue()
        child = context.Process(target=_memory_child,
                                args=(checkpoint, placement, table_dir, batch, new_tokens, threads, queue))
        child.start()
        results.append(_result_of(child, queue))
        child.join()
        row = results[-1]
        log(f"  {placement:<9} peak +{row['peak_mb']:8.1f} MB  after load +{row['after_load_mb']:8.1f} MB  "
            f"end +{row['end_mb']:8.1f} MB")
    return results


def goal_lines(model: dict[str, Any]) -> list[str]:
    """The issue's goals for one model, each with the figure measured and met / not met."""
    speed = {(row["batch"], row["variant"]): row["vs_resident"] for row in model["speed"]}
    goals = []
    for batch in sorted({batch for batch, _ in speed}):
        for variant in ("host", "disk"):
            goals.append((f"{variant} ≥ 0.95× resident tok/s at batch {batch}" +
                          (" (warm page cache)" if variant.startswith("disk") else ""),
                          f"{speed[batch, variant]:.3f}×", speed[batch, variant] >= 0.95))
    disk = next((row for row in model.get("memory", []) if row["placement"] == "disk"), None)
    if disk is not None:
        goals.append(("peak resident memory added with the disk placement below the table size",
                      f"{disk['peak_mb']:.0f} MiB vs {model['table_bytes'] / 2**20:.0f} MiB",
                      disk["peak_mb"] * 2**20 < model["table_bytes"]))
    return [f"- {goal}: {figure}, {'met' if met else 'NOT met'}" for goal, figure, met in goals]


def write_report(results: dict[str, Any], json_path: Path, markdown_path: Path, command: str) -> None:
    """The results as JSON, and as the markdown page docs/inference_benchmarks.md."""
    from l3train.utils.atomic import atomic_write_text

    atomic_write_text(json_path, json.dumps(results, indent=1) + "\n")
    lines = ["# Inference benchmarks", "",
             "Written by `tools/bench_inference.py` (see [inference.md](inference.md) for what is measured). "
             "Random weights; decode tokens/s after the prefill, median of interleaved repetitions; "
             "“× resident” is the median of the per-repetition ratios. Where a step's wall time goes: "
             "the CPU time of the thread running the model (without prefetch it includes staging the "
             "rows: the wait), the time it is blocked on the prefetch (the wait, with prefetch), and "
             "off-CPU time, when it could run but does not: other processes hold the core, or the "
             "prefetch thread holds the GIL.", "",
             f"Command: `{command}`", "",
             f"Machine: {results['machine']}; torch threads: {results['threads']}; "
             f"{results['new_tokens']} new tokens per sequence, {results['reps']} repetitions. Shared with other "
             f"work: 5-minute load average {results['load_average_at_start']:.1f} at the start, "
             f"{results['load_average_at_end']:.1f} at the end (on {os.cpu_count()} cores).", ""]
    for model in results["models"]:
        lines += [f"## {model['name']}: {model['description']}", "",
                  f"L³ tables: {model['table_bytes'] / 2**20:.1f} MiB in all.", "",
                  "| batch | variant | tok/s | × resident | KiB staged/token | stalls/lookup | ms/step: wall "
                  "| CPU | wait for rows | off-CPU |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in model["speed"]:
            lines.append(f"| {row['batch']} | {row['variant']} | {row['tokens_per_s']:.1f} | {row['vs_resident']:.2f} | "
                         f"{row['bytes_per_token'] / 1024:.1f} | {row['stalls_per_lookup']:.2f} | "
                         f"{row['wall_ms_per_step']:.2f} | {row['cpu_ms_per_step']:.2f} | {row['wait_ms_per_step']:.2f} | "
                         f"{row['off_cpu_ms_per_step']:.2f} |")
        lines += ["", *goal_lines(model)]
        if model.get("memory"):
            lines += ["", f"Resident memory added by loading and generating (batch {results['memory_batch']}, "
                      "a fresh process per placement):", "",
                      "| placement | peak | after load | at the end | peak / table size |", "|---|---:|---:|---:|---:|"]
            for row in model["memory"]:
                lines.append(f"| {row['placement']} | {row['peak_mb']:.1f} MiB | {row['after_load_mb']:.1f} MiB | "
                             f"{row['end_mb']:.1f} MiB | {row['peak_mb'] * 2**20 / model['table_bytes']:.2f} |")
        lines.append("")
    atomic_write_text(markdown_path, "\n".join(lines))

"""The driver of tools/gpu_check.sh: parts, one deadline, isolated failures, figures to a folder.

A GPU machine may be lent for minutes, once. So the check is planned for a deadline: the
parts share it by weight (`Part.share`), and the time a part leaves unused goes to the
parts after it (`part_cap`), so the caps always fit the deadline. Each part runs in its own
process (`l3train.benchmarks.gpu_parts`), which records every figure as soon as it has it,
each comparison isolated (a failure is one FAILED line and the part goes on); a part that
overruns its cap is stopped, with the figures it had. Everything a part prints goes to
the log in the output folder; the terminal gets each part's figure lines and, last, a
summary table, so the end of a long output (all that some machines return) holds the
results. `figures.json` in the output folder has every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_write_text


@dataclass(frozen=True)
class Part:
    name: str
    needs_cuda: bool  # skipped (with the reason) on a machine without a CUDA GPU
    share: float  # of the deadline, relative to the other selected parts
    needs: tuple[str, ...]  # parts whose output this one reads (selected with it)
    what: str


PARTS: tuple[Part, ...] = (
    Part("preflight", False, 0.03, (),
         "the GPU, torch/CUDA/Triton versions, a C compiler (Triton builds its launcher with it), and "
         "imports of every package l3train needs (the kit's wheels)"),
    Part("data", False, 0.04, (),
         "the quick start's data (from --kit DIR/data, or built: stdlib corpus, tokenizer, .bin/.idx, LZW)"),
    Part("kernels", True, 0.20, (),
         "compiled Triton kernels against fp64: the unit tests' cases; Zipf ids over a 32K vocabulary, "
         "16K positions, k = 512, d = 1024, tied and untied, fp32 and bf16; a table whose row offsets "
         "times width pass 2^31; gradcheck in fp64"),
    Part("benchmark", True, 0.17, (),
         "the kernel at 16K and 64K positions: plan, forward, dX and dK/dV timed apart; the torch path "
         "(training's feature width) with TF32 on and off; a tile sweep; useful L3 TFLOP/s against a dense "
         "bf16 matmul of equal FLOPs"),
    Part("train", False, 0.30, ("data",),
         "configs/tiny_l3.yaml and its iso-FLOP dense model, bf16 at ZeRO-2, interleaved: tokens/s side "
         "by side; host synchronisations per step after warm-up inside l3train/model (CUDA)"),
    Part("sharded", False, 0.08, (),
         "the sharded L3 rows, bf16 accumulation and global clipping as a world of one (NCCL on a GPU)"),
    Part("inference", True, 0.18, ("data", "train"),
         "the trained tiny L3 model: resident, pinned-host and disk placements, logits compared with "
         "torch.equal, tokens/s at batch 1 and 16; only the staging buffer pinned"),
)
PART_NAMES = tuple(part.name for part in PARTS)
DEFAULT_DEADLINE_S = 480.0
DESCRIPTION = ("Check l3train's GPU paths on one GPU within one deadline: each part's figures as it runs, "
               "a summary table last, and gpu_check.log, figures.json and summary.txt in --out.")


def select_parts(names: list[str] | None) -> tuple[list[Part], list[str]]:
    """The parts to run, in their order, with the parts they need; and a line per part added for that."""
    by_name = {part.name: part for part in PARTS}
    unknown = [name for name in names or [] if name not in by_name]
    if unknown:
        raise L3TrainError(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PART_NAMES)}")
    wanted = set(names or PART_NAMES)
    added = []
    for part in reversed(PARTS):  # a part's needs come before it: one backward pass closes the set
        if part.name in wanted:
            for need in part.needs:
                if need not in wanted:
                    wanted.add(need)
                    added.append(f"{part.name} needs {need}: added")
    return [part for part in PARTS if part.name in wanted], added


def part_cap(part: Part, remaining_parts: list[Part], remaining_s: float) -> float:
    """Seconds `part` may take: its share of the time left among the parts still to run (itself
    included), so what earlier parts left unused goes to the later ones and the caps add up
    to no more than the deadline."""
    total = sum(p.share for p in remaining_parts)
    return max(0.0, remaining_s * part.share / total)


@dataclass
class PartResult:
    name: str
    status: str  # ok, FAILED, TIMEOUT, skipped
    seconds: float
    figures: list[dict[str, Any]]
    reason: str = ""


def read_figures(path: Path) -> list[dict[str, Any]]:
    """The figures a part recorded (gpu_parts.Figures); a part stopped mid-write leaves the previous file."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def run_part(part: Part, command: list[str], env: dict[str, str], cap_s: float, work: Path,
             log_file: Path) -> PartResult:
    """Run one part's process with its output appended to `log_file`; stop its whole process
    group at `cap_s` (torchrun and trainers included)."""
    figures_path = work / f"figures_{part.name}.json"
    figures_path.unlink(missing_ok=True)
    start = time.monotonic()
    with open(log_file, "a") as log:
        log.write(f"\n=== {part.name} (cap {cap_s:.0f} s): {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen([*command, "--figures", str(figures_path)], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        try:
            status = process.wait(timeout=cap_s)
            reason = "" if status == 0 else f"exit status {status}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status, reason = None, f"stopped at its cap of {cap_s:.0f} s"
    figures = read_figures(figures_path)
    if status is None:
        state = "TIMEOUT"
    elif status == 0 and not any(figure.get("ok") is False for figure in figures):
        state = "ok"
    else:
        state = "FAILED"
    return PartResult(part.name, state, time.monotonic() - start, figures, reason)


def summary_table(results: list[PartResult], deadline_s: float, elapsed_s: float) -> list[str]:
    lines = [f"{'part':10s} {'status':8s} {'time':>6s}  checks  figures",
             f"{'-' * 10} {'-' * 8} {'-' * 6}  ------  -------"]
    for result in results:
        checks = [figure for figure in result.figures if figure.get("ok") is not None]
        passed = sum(bool(figure["ok"]) for figure in checks)
        highlights = "; ".join(figure["text"] for figure in result.figures if figure.get("summary"))
        detail = result.reason if result.status in ("skipped", "TIMEOUT") or not highlights else highlights
        lines.append(f"{result.name:10s} {result.status:8s} {result.seconds:5.0f}s  {passed:>3d}/{len(checks):<3d} "
                     f" {detail}")
    lines.append(f"total {elapsed_s:.0f} s of a {deadline_s:.0f} s deadline")
    return lines


def run_check(parts: list[Part], deadline_s: float, out: Path, work: Path, cuda_parts_run: bool,
              part_command: Callable[[Part], list[str]], env: dict[str, str],
              echo: Callable[[str], None] = print) -> list[PartResult]:
    """Run `parts` in order within `deadline_s`; write the log, figures.json and summary.txt to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)  # runs and tables of an earlier check: start afresh
    work.mkdir(parents=True)
    log_file = out / "gpu_check.log"
    log_file.write_text("")
    start = time.monotonic()
    results: list[PartResult] = []

    def write_figures() -> None:
        atomic_write_text(out / "figures.json", json.dumps(
            {"deadline_s": deadline_s, "cuda_parts_run": cuda_parts_run,
             "parts": {r.name: {"status": r.status, "seconds": round(r.seconds, 1), "reason": r.reason,
                                "figures": r.figures} for r in results}}, indent=1) + "\n")

    for index, part in enumerate(parts):
        echo(f"\n=== {part.name}: {part.what}")
        missing = [need for need in part.needs if need in {r.name for r in results if r.status != "ok"}]
        if part.needs_cuda and not cuda_parts_run:
            result = PartResult(part.name, "skipped", 0.0, [], "needs a CUDA GPU (torch.cuda.is_available() is False)")
        elif missing:
            result = PartResult(part.name, "skipped", 0.0, [], f"needs {', '.join(missing)}, which did not pass")
        else:
            cap = part_cap(part, parts[index:], deadline_s - (time.monotonic() - start))
            result = run_part(part, part_command(part), env, cap, work, log_file)
            for figure in result.figures:
                echo(("FAILED " if figure.get("ok") is False else "") + figure["text"])
        if result.status != "ok":
            echo(f"{part.name}: {result.status}" + (f" ({result.reason})" if result.reason else "")
                 + (f"; its output is in {log_file}" if result.status in ("FAILED", "TIMEOUT") else ""))
        results.append(result)
        write_figures()
    lines = summary_table(results, deadline_s, time.monotonic() - start)
    atomic_write_text(out / "summary.txt", "\n".join(lines) + "\n")
    echo("\n=== summary (figures.json, summary.txt and gpu_check.log in " + str(out) + ")")
    for line in lines:
        echo(line)
    return results


def main(argv: list[str] | None = None) -> int:
    from l3train.errors import CliArgumentParser

    parser = CliArgumentParser(prog="tools/gpu_check.sh", description=DESCRIPTION,
                               epilog="parts:\n" + "\n".join(f"  {p.name:10s} {'(CUDA) ' if p.needs_cuda else ''}"
                                                             f"{p.what}" for p in PARTS),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PART_NAMES),
                        help="comma-separated parts to run, in their fixed order (default: all); a part's "
                             "prerequisites are added")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S / 60,
                        help=f"minutes for the whole check (default {DEFAULT_DEADLINE_S / 60:g})")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="folder for gpu_check.log, figures.json and summary.txt (default: $OUT, else "
                             "gpu_check_out)")
    parser.add_argument("--kit", default="gpu_kit", help="the folder tools/gpu_kit.sh built (its data/ is used)")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every part, the CUDA ones too, at toy sizes on this machine (without a GPU: on "
                             "the CPU, kernels in Triton's interpreter): a check of the check, not of the GPU")
    args = parser.parse_args(argv)
    if args.deadline <= 0:
        raise L3TrainError(f"--deadline must be positive (minutes), got {args.deadline:g}")
    parts, added = select_parts([name.strip() for name in args.parts.split(",") if name.strip()])
    for line in added:
        print(f"[gpu_check] {line}")

    import torch

    cuda = torch.cuda.is_available()
    out = Path(args.out).resolve()
    work = out / "work"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.rehearse and not cuda:
        env["TRITON_INTERPRET"] = "1"

    def part_command(part: Part) -> list[str]:
        return [sys.executable, "-m", "l3train.benchmarks.gpu_parts", part.name, "--work", str(work),
                "--kit", str(Path(args.kit).resolve()), *(["--rehearse"] if args.rehearse else [])]

    print(f"[gpu_check] parts {', '.join(p.name for p in parts)}; deadline {args.deadline:g} min; "
          f"{'CUDA: ' + torch.cuda.get_device_name(0) if cuda else 'no CUDA device: the CUDA parts are '}"
          f"{'' if cuda else 'rehearsed on the CPU' if args.rehearse else 'skipped'}; "
          f"output {out}")
    results = run_check(parts, args.deadline * 60, out, work, cuda or args.rehearse, part_command, env)
    failed = [r.name for r in results if r.status in ("FAILED", "TIMEOUT")]
    print(f"gpu_check: {'FAILED (' + ', '.join(failed) + ')' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    from l3train.errors import run_cli

    run_cli(main)

"""Models taking turns on one machine: each keeps its trainer processes, one trains at a time.

A shared machine's speed drifts. On the 2-core development machine one step of the same
model took 160-260 ms from minute to minute, and ±15% from step to step, so whole runs of
the models one after the other (A B C A B C ..., each ~15 s with its start-up) compare
moments as much as models: two pairs of such runs a minute apart gave L³ ÷ dense ratios of
0.83 and 1.05.
Here every model's ranks stay alive (the real `Trainer`: its DeepSpeed engine, data,
optimizer and monitor, its own processes and memory) and the models take turns of a few
steps, every second or so; a model whose turn it is not waits on its command pipe and uses
no CPU. A slow moment then hits the models within a second of each other.

`ModelRanks` starts one model's ranks and hands them turns. Each rank is

    python -m l3train.benchmarks.turns --config C --reply-fd N [key=value ...]

started without torchrun (the rank environment set by hand, so that every rank reads its
commands on stdin): it builds the trainer, answers "ready" on file descriptor N, then for
each line "k" on stdin trains k steps (logging each to metrics.jsonl as training does) and
answers "done"; it ends at the end of its input.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TextIO

from l3train.errors import L3TrainError

# How long a rank that failed gets to write its error and exit before it is killed.
EXIT_SECONDS = 30


class ModelRanks:
    """One model's `nproc` trainer processes on this machine, taking commands (a context
    manager: leaving it ends them). Rank r's output goes to `log_dir`/<run_dir's name>_rank<r>.log."""

    def __init__(self, config: str, nproc: int, run_dir: Path, overrides: list[str], log_dir: Path) -> None:
        from l3train.benchmarks.training import threads_per_rank
        from l3train.distributed import free_port

        self.run_dir = run_dir
        self.what = f"benchmark run of {config} on {nproc} rank(s)"
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
                      "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": threads_per_rank(nproc)}
        self.processes: list[subprocess.Popen] = []
        self.replies: list[TextIO] = []
        self.failed = False  # reported already: `close` does not report it again
        self.logs = [log_dir / f"{run_dir.name}_rank{rank}.log" for rank in range(nproc)]
        try:
            for rank, log_path in enumerate(self.logs):
                read_end, write_end = os.pipe()
                self.replies.append(os.fdopen(read_end))
                try:
                    with open(log_path, "w") as log:
                        self.processes.append(subprocess.Popen(
                            [sys.executable, "-m", "l3train.benchmarks.turns", "--config", config, "--reply-fd",
                             str(write_end), f"run_dir={run_dir}", *overrides],
                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                            pass_fds=(write_end,), env={**os.environ, **rendezvous, "RANK": str(rank),
                                                        "LOCAL_RANK": str(rank)}))
                finally:
                    os.close(write_end)
        except BaseException:
            self.close(kill=True)
            raise

    def __enter__(self) -> ModelRanks:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close(kill=kind is not None)

    def wait_for(self, answer: str) -> None:
        """Until every rank answered `answer`. Ranks are watched together: when one ends instead,
        the others may be waiting for it in a collective, so the failure is reported at once,
        by the error line of the rank that has one."""
        pending = dict(enumerate(self.replies))
        while pending:
            ready, _, _ = select.select(list(pending.values()), [], [])
            for rank in [rank for rank, reply in pending.items() if reply in ready]:
                if pending.pop(rank).readline().strip() != answer:
                    raise L3TrainError(f"{self.what} failed: {self._cause(rank)}")

    def train(self, steps: int) -> None:
        """Every rank trains `steps` steps; returns when all have."""
        for rank, process in enumerate(self.processes):
            try:
                process.stdin.write(f"{steps}\n")
                process.stdin.flush()
            except OSError:  # it ended while it waited for its turn
                raise L3TrainError(f"{self.what} failed: {self._cause(rank)}") from None
        self.wait_for("done")

    def close(self, kill: bool = False) -> None:
        """End the ranks (their input ends; killed with `kill`) and wait for them."""
        for process in self.processes:
            if kill:
                process.kill()
            try:
                process.stdin.close()
            except OSError:  # a pipe whose reader is gone
                pass
        for process in self.processes:
            try:
                process.wait(timeout=EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for reply in self.replies:
            reply.close()
        failed = [rank for rank, process in enumerate(self.processes) if process.returncode != 0]
        if failed and not kill and not self.failed:
            raise L3TrainError(f"{self.what} failed: {self._cause(failed[0])}")

    def _cause(self, first: int) -> str:
        """Why the model failed, rank `first` having ended first: once that rank exited, its own
        one-line error; else the first other rank's that has one (a rank can end first because
        it lost its peer, whose error line names the cause); else `first`'s last line of output."""
        from l3train.benchmarks.training import error_line

        self.failed = True
        try:
            self.processes[first].wait(timeout=EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.processes[first].kill()
        outputs = [log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                   for log in self.logs]
        print("\n".join(outputs[first][-40:]), file=sys.stderr)  # the details, for a log
        for rank in [first, *range(len(outputs))]:
            if error := error_line(outputs[rank]):
                return f"rank {rank}: {error}"
        return f"rank {first}: {(outputs[first] or ['no output'])[-1]}"


def main(argv: list[str] | None = None) -> int:
    from l3train.config import load_config
    from l3train.errors import CliArgumentParser

    parser = CliArgumentParser(prog="python -m l3train.benchmarks.turns", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--reply-fd", type=int, required=True, help="file descriptor to answer on")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    replies = os.fdopen(args.reply_fd, "w", buffering=1)
    from l3train.trainer.trainer import Trainer  # torch, DeepSpeed: after the config is known good

    trainer = Trainer(cfg)
    try:
        trainer.build()
        replies.write("ready\n")
        start = time.time()
        for line in sys.stdin:
            for _ in range(int(line)):
                stats = trainer.train_step(trainer.batch(trainer.step))
                trainer.monitor.record(stats, time.time() - start)
            replies.write("done\n")
        trainer.monitor.close()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    from l3train.errors import run_cli

    run_cli(main)

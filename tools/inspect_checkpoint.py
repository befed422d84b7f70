#!/usr/bin/env python
"""Describe a checkpoint and verify it against its manifest, without loading the model.

PATH is a run_dir (its `latest` checkpoint), a checkpoints/step_* training checkpoint, or
a consolidated checkpoint. Printed: the kind, step and tokens seen (step × global batch ×
sequence length), the world layout it was written with (world size, TP, DP, EP, ZeRO
stage, sharded L³ rows, split experts; for a consolidated checkpoint, its source's),
the precision, the model and its exact parameter count, the L³ allocation's statistics
(vocab, v rows, cap k, min/mean/median rows per token, mode, hash), and whether every
file matches the manifest's size and CRC-32.

    python tools/inspect_checkpoint.py runs/tiny
    python tools/inspect_checkpoint.py runs/tiny/checkpoints/step_00000200 --tensors
    python tools/inspect_checkpoint.py exports/tiny_consolidated --tensors --no-verify
    python tools/inspect_checkpoint.py runs/tiny --json | jq .allocation

--tensors lists every tensor's name, shape and dtype: of a consolidated checkpoint from
its safetensors headers, of a training checkpoint per file (each TP rank's model states,
each rank-local file of sharded L³ rows or experts; those hold unnamed tensors, listed by
position), memory-mapped, so nothing large is read.

Exit status: 0 when the checkpoint verifies (or --no-verify), 1 when it does not (the
problem is in the report and on stderr), 2 for a path that is not a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from l3train.checkpoint.inspect import describe_checkpoint, format_report
from l3train.errors import CliArgumentParser, run_cli


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="PATH", help="run_dir, checkpoints/step_* directory or consolidated checkpoint")
    parser.add_argument("--tensors", action="store_true", help="list every tensor's name, shape and dtype")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksums (read no file in full)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args()
    report = describe_checkpoint(args.path, verify=not args.no_verify, tensors=args.tensors)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    if not report.ok:
        print(f"error: checkpoint {report.directory} does not verify: {report.manifest.problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)

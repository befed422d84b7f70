#!/usr/bin/env python
"""Resolve requirements.txt as a Linux CUDA machine would, without installing anything.

Asks pip for the set it would install, for CPython --python-version on a manylinux machine
(--glibc, --arch), given
the CUDA build of torch (--torch, from the package index: on Linux x86_64 the index's torch
is the CUDA build, which pins its Triton and pulls the nvidia-* libraries), and prints the
chosen torch and Triton and whether the set is a CUDA one. Packages the index has only as
source (DeepSpeed) cannot be resolved for another platform; they are replaced by their own
requirements, read from their installed metadata (--source-only). Exit status 0 when pip
finds a set, 1 when it cannot (its reason is printed), 2 for bad arguments.

    python tools/check_install.py                        # torch==2.13.0, CPython 3.12, glibc 2.28, x86_64
    python tools/check_install.py --torch torch==2.11.0 --python-version 3.11
    python tools/check_install.py --pip-option=--no-index --pip-option=--find-links=DIR   # a local index
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from l3train.errors import CliArgumentParser, L3TrainError, run_cli

REPO = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path, source_only: set[str]) -> list[str]:
    """The requirements of `path`, with each source-only package replaced by its own requirements."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = canonicalize_name(Requirement(line).name)
        if name not in source_only:
            lines.append(line)
            continue
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            raise L3TrainError(f"{name} is listed as source-only but is not installed here, so its requirements "
                               f"are unknown; install it (tools/setup_env.sh) or drop --source-only {name}") from None
        lines += [need for need in needs if "extra ==" not in need]
    return lines


def manylinux_platforms(glibc: str, arch: str) -> list[str]:
    """Every manylinux tag a machine with this glibc accepts (pip matches --platform tags exactly)."""
    major, minor = (int(part) for part in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for version, name in legacy.items() if version <= minor]


def resolve(requirements: list[str], torch: str, python_version: str, platforms: list[str],
            pip_options: list[str]) -> dict:
    """pip's installation report for `requirements` plus `torch` on that platform (no install)."""
    with tempfile.TemporaryDirectory(prefix="l3train-check-install-") as scratch:
        report = Path(scratch) / "report.json"
        listed = Path(scratch) / "requirements.txt"
        listed.write_text("\n".join([torch, *requirements]) + "\n")
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--disable-pip-version-check", "--only-binary=:all:", "--implementation", "cp",
                   "--python-version", python_version, *(f"--platform={tag}" for tag in platforms),
                   "--target", str(Path(scratch) / "t"),
                   "--report", str(report), *pip_options, "-r", str(listed)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            reason = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or \
                result.stderr.strip().splitlines()[-3:]
            raise L3TrainError(f"pip cannot resolve these requirements for {platforms[0]}, CPython "
                               f"{python_version}: " + " | ".join(reason))
        return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = CliArgumentParser(prog="tools/check_install.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt")
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement (default torch==2.13.0)")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--glibc", default="2.28", help="the machine's glibc (default 2.28)")
    parser.add_argument("--arch", default="x86_64")
    parser.add_argument("--source-only", action="append", default=None, metavar="NAME",
                        help="a package the index has only as source (default: deepspeed); repeat for more, "
                             "or pass '' for none")
    parser.add_argument("--pip-option", action="append", default=[], metavar="OPTION",
                        help="an extra pip option, e.g. --pip-option=--no-index (repeatable)")
    args = parser.parse_args(argv)
    if not args.requirements.is_file():
        raise L3TrainError(f"requirements file {args.requirements} not found; pass --requirements PATH")
    source_only = {canonicalize_name(name) for name in (args.source_only if args.source_only is not None else ["deepspeed"])
                   if name}
    if not re.fullmatch(r"2\.\d+", args.glibc):
        raise L3TrainError(f"--glibc must look like 2.28, got {args.glibc!r}")
    platforms = manylinux_platforms(args.glibc, args.arch)
    report = resolve(requirement_lines(args.requirements, source_only), args.torch, args.python_version,
                     platforms, args.pip_option)
    chosen = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    cuda = sorted(name for name in chosen if name.startswith("nvidia-"))
    print(f"resolved {len(chosen)} packages for {platforms[0]}, CPython {args.python_version}: "
          f"torch {chosen.get('torch', 'none')}, triton {chosen.get('triton', 'none')}; "
          + (f"a CUDA set ({len(cuda)} nvidia-* packages, e.g. {', '.join(cuda[:3])})" if cuda
             else "no nvidia-* packages (not a CUDA build of torch)"))
    return 0


if __name__ == "__main__":
    run_cli(main)

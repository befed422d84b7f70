"""tools/gpu_check.sh's driver (parts, deadline, isolation, output folder) and tools/check_install.py.

The driver runs real processes here: each part is a small Python program that records figures
the way l3train.benchmarks.gpu_parts does, then fails, hangs or exits as the test needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from training_harness import REPO

from l3train.benchmarks.gpu_check import PART_NAMES, PARTS, Part, part_cap, run_check, select_parts
from l3train.benchmarks.gpu_parts import Figures
from l3train.errors import L3TrainError

# A part process: records figures into the file named by its last argument (as gpu_parts does).
PART_PROGRAM = textwrap.dedent("""
    import json, os, subprocess, sys, time
    path, action = sys.argv[-1], sys.argv[1]
    items = []
    def add(text, ok=None):
        items.append({"text": text, "ok": ok, "summary": True})
        open(path + ".tmp", "w").write(json.dumps(items)); os.replace(path + ".tmp", path)
    add(f"{action} first figure", ok=True)
    if action == "fail":
        add("a comparison", ok=False)
        add("the figure after it")
        sys.exit(1)
    if action == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(sys.argv[2], "w").write(str(child.pid))
        time.sleep(600)
""")


def parts(*specs: tuple[str, bool, tuple[str, ...]]) -> list[Part]:
    return [Part(name, cuda, 1.0, needs, f"the {name} part") for name, cuda, needs in specs]


def test_select_parts_adds_prerequisites_in_order_and_refuses_unknown_names():
    selected, added = select_parts(["inference"])
    assert [part.name for part in selected] == ["data", "train", "inference"]
    assert added == ["inference needs data: added", "inference needs train: added"]
    assert [part.name for part in select_parts(None)[0]] == list(PART_NAMES)
    assert [part.name for part in select_parts(["kernels", "preflight"])[0]] == ["preflight", "kernels"]
    with pytest.raises(L3TrainError, match="unknown part.*kernel; the parts are preflight"):
        select_parts(["kernel"])


def test_caps_fit_the_deadline_and_pass_unused_time_on():
    deadline = 480.0
    remaining, caps = deadline, []
    for index, part in enumerate(PARTS):  # every part uses its whole cap: the caps add up to the deadline
        caps.append(part_cap(part, list(PARTS[index:]), remaining))
        remaining -= caps[-1]
    assert sum(caps) == pytest.approx(deadline)
    assert all(cap > 0 for cap in caps)
    # A part that finishes at once leaves its time to the later ones, in proportion to their shares.
    later = list(PARTS[1:])
    assert part_cap(later[0], later, deadline) > caps[1]


def test_a_failure_does_not_stop_the_check_a_hang_is_cut_at_its_cap_and_the_summary_comes_last(tmp_path):
    plan = parts(("first", False, ()), ("failing", False, ()), ("hanging", False, ()), ("gpu", True, ()),
                 ("after_failing", False, ("failing",)), ("last", False, ()))
    child_pid = tmp_path / "child.pid"
    actions = {"first": ["ok"], "failing": ["fail"], "hanging": ["hang", str(child_pid)], "last": ["ok"],
               "after_failing": ["ok"]}
    lines: list[str] = []
    start = time.monotonic()
    results = run_check(plan, deadline_s=12.0, out=tmp_path / "out", work=tmp_path / "work", cuda_parts_run=False,
                        part_command=lambda part: [sys.executable, "-c", PART_PROGRAM, *actions[part.name]],
                        env=dict(os.environ), echo=lines.append)
    assert time.monotonic() - start < 12.0 + 5
    status = {result.name: result.status for result in results}
    assert status == {"first": "ok", "failing": "FAILED", "hanging": "TIMEOUT", "gpu": "skipped",
                      "after_failing": "skipped", "last": "ok"}
    failing = next(result for result in results if result.name == "failing")
    assert [figure["text"] for figure in failing.figures] == ["fail first figure", "a comparison",
                                                               "the figure after it"]
    hanging = next(result for result in results if result.name == "hanging")
    assert hanging.figures and "stopped at its cap" in hanging.reason
    with pytest.raises(ProcessLookupError):  # the hanging part's own child went with it
        for _ in range(50):
            os.kill(int(child_pid.read_text()), 0)
            time.sleep(0.1)
    assert "FAILED a comparison" in lines
    assert lines[-1].startswith("total ") and lines[-1].endswith("of a 12 s deadline")
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary == lines[-len(summary):]
    assert any(line.startswith("gpu        skipped") and "needs a CUDA GPU" in line for line in summary)
    assert any(line.startswith("after_failing skipped") and "needs failing, which did not pass" in line
               for line in summary)
    written = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert written["parts"]["failing"]["figures"][1] == {"text": "a comparison", "ok": False, "summary": True}
    assert "=== hanging (cap" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_figures_check_isolates_an_exception_and_the_next_figure_is_kept(tmp_path, capsys):
    figures = Figures(tmp_path / "figures.json")

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore detail")

    assert figures.check("a kernel case", broken) is None
    figures.add("the next case: ok", ok=True)
    recorded = json.loads((tmp_path / "figures.json").read_text())
    assert [item["text"] for item in recorded] == ["a kernel case: RuntimeError: CUDA error: an illegal memory access",
                                                   "the next case: ok"]
    assert figures.failed and recorded[0]["ok"] is False
    assert "FAILED a kernel case" in capsys.readouterr().out


def test_the_script_lists_its_parts_and_refuses_an_unknown_one_in_one_line():
    shown = subprocess.run(["bash", "tools/gpu_check.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0
    for name in PART_NAMES:
        assert f"\n  {name} " in shown.stdout
    refused = subprocess.run(["bash", "tools/gpu_check.sh", "--parts", "kernels,trian"], cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: unknown part(s) trian; the parts are " + ", ".join(PART_NAMES)]


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A minimal pure-Python wheel: enough metadata for pip's resolver."""
    dist = f"{name}-{version}.dist-info"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
                       + [f"Requires-Dist: {need}\n" for need in requires])
    files = {f"{dist}/METADATA": metadata,
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{name}/__init__.py": ""}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


def test_check_install_refuses_a_triton_pin_the_cuda_torch_cannot_take(tmp_path):
    """Offline, on a local index shaped like PyPI's: torch 2.13.0 on Linux requires triton==3.7.1."""
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "torch", "2.13.0", ["triton==3.7.1", "nvidia-cublas>=13"])
    _wheel(index, "nvidia_cublas", "13.1.0", [])
    for version in ("3.7.1", "3.9.0"):
        _wheel(index, "triton", version, [])
    offline = ["--source-only", "", "--pip-option=--no-index", f"--pip-option=--find-links={index}"]

    def check(requirements: str) -> subprocess.CompletedProcess:
        path = tmp_path / "requirements.txt"
        path.write_text(requirements)
        env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_CONFIG_FILE": os.devnull}
        return subprocess.run([sys.executable, "tools/check_install.py", "--requirements", str(path), *offline],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=120)

    pinned = check("torch>=2.11\ntriton==3.9.0\n")
    assert pinned.returncode == 2, pinned.stdout
    assert pinned.stderr.startswith("error: pip cannot resolve these requirements for manylinux_2_28_x86_64")
    assert "conflicting dependencies" in pinned.stderr
    ranged = check("torch>=2.11  # a comment\ntriton>=3.6\n")
    assert ranged.returncode == 0, ranged.stderr
    assert "torch 2.13.0, triton 3.7.1; a CUDA set (1 nvidia-* packages" in ranged.stdout


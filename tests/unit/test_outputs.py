"""refuse_existing / --overwrite: tools never replace an existing output unless asked to."""

from __future__ import annotations

import subprocess
import sys

import pytest
from training_harness import REPO

from l3train.errors import L3TrainError
from l3train.utils.outputs import refuse_existing


def test_the_first_existing_output_is_named_with_what_it_is_and_both_ways_out(tmp_path):
    (tmp_path / "b.idx").write_text("x")
    refuse_existing([tmp_path / "none.bin"], "a dataset")  # nothing there: passes
    with pytest.raises(L3TrainError) as refused:
        refuse_existing([tmp_path / "a.bin", tmp_path / "b.idx"], "a tokenized dataset")
    assert str(refused.value) == (f"{tmp_path / 'b.idx'} already exists (a tokenized dataset); pass --overwrite "
                                  "to replace it, or choose another output path")
    refuse_existing([tmp_path / "b.idx"], "a tokenized dataset", overwrite=True)


def test_a_dangling_symlink_counts_as_existing(tmp_path):
    (tmp_path / "link.npz").symlink_to(tmp_path / "elsewhere.npz")
    with pytest.raises(L3TrainError, match="link.npz already exists"):
        refuse_existing([tmp_path / "link.npz"], "an allocation")


def test_overwrite_replaces_and_without_it_the_file_is_kept(tmp_path):
    output = tmp_path / "dense.yaml"
    output.write_text("# mine\n")
    command = [sys.executable, str(REPO / "tools" / "size_configs.py"), "--config", "configs/tiny_l3.yaml",
               "--rows", "32768", "--mean-rows", "30", "--output-dense", str(output)]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and output.read_text() == "# mine\n"
    assert refused.stderr.startswith(f"error: {output} already exists (a config file); pass --overwrite")
    replaced = subprocess.run([*command, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert replaced.returncode == 0, replaced.stderr
    assert "Iso-FLOP dense baseline" in output.read_text()

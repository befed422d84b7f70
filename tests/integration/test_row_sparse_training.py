"""One process, ZeRO-0, fp32 on the CPU: the L³ tables reach the optimizer as row-sparse
gradients (only the rows the step's tokens own; no table-shaped gradient), and the run
matches the table-shaped reference (the kernel's whole-table gradient, torch's fused AdamW)."""

import subprocess
import sys
from pathlib import Path

import torch
from training_harness import REPO, tiny_l3_config, trainer_env, write_config

WORKER = Path(__file__).parent / "workers" / "row_sparse_worker.py"


def run(config: Path, out: Path, mode: str) -> dict:
    # 2 micro-batches per step: the second one's rows are added to the first's.
    subprocess.run([sys.executable, str(WORKER), str(config), str(out), mode, "training.steps=4",
                    "training.micro_batch_size=4", "training.global_batch_size=8"],
                   cwd=REPO, env=trainer_env(), check=True, capture_output=True, timeout=300)
    return torch.load(out)


def test_one_process_steps_row_sparse_table_gradients(tmp_path, tiny_corpus, tiny_allocation):
    config = write_config(tmp_path / "config.yaml", tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation))
    sparse = run(config, tmp_path / "sparse.pt", "row-sparse")
    config = write_config(tmp_path / "config.yaml", tiny_l3_config(tmp_path / "ref", tiny_corpus, tiny_allocation))
    reference = run(config, tmp_path / "reference.pt", "table-shaped")
    assert sparse["micro_batches"] == 2 and len(sparse["seen"]) == 4
    for step in sparse["seen"]:
        for (is_sparse, rows), table_rows in zip(step, sparse["rows"]):
            assert is_sparse and 0 < rows < table_rows, (step, sparse["rows"])  # coalesced: each row once
    assert all(not is_sparse for step in reference["seen"] for is_sparse, _ in step)
    # The same AdamW arithmetic (to an ulp here and there: l3train.row_adamw).
    torch.testing.assert_close(torch.tensor(sparse["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    for got, want in zip(sparse["tables"], reference["tables"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

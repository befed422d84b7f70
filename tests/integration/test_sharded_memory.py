"""Per-rank construction of sharded L³ rows: at 4 ranks, building the model and its parallel
parts raises a rank's peak resident memory by about a quarter of the tables, not the whole
tables (which every rank used to initialise before slicing out its shard).

Run as a script under torchrun, this file is the worker: it reports each rank's peak RSS
growth over building the parallel model, with the tables deferred (per rank) and not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_harness import REPO, finish_worker, free_port, tiny_l3_config, trainer_env, write_config

from l3train.model.l3_layer import INIT_BLOCK_ROWS

ROWS = 1 << 19  # uniform: 1,024 rows per token of the 512-token test vocabulary
D_MODEL = 128  # one tied table: 2^19 × 128 fp32 = 256 MB, a quarter 64 MB


@pytest.mark.slow
def test_each_rank_builds_only_its_quarter_of_the_tables(tmp_path, tiny_corpus):
    allocation = tmp_path / "uniform.npz"
    subprocess.run([sys.executable, "tools/lzw_allocate.py", "--mode", "uniform", "--tokenizer",
                    str(tiny_corpus.tokenizer_path), "--budget", str(ROWS), "--cap", str(ROWS // 512),
                    "--output", str(allocation)], cwd=REPO, env=trainer_env(), check=True, capture_output=True)
    tree = tiny_l3_config(tmp_path / "run", tiny_corpus, allocation)
    tree["model"]["d_model"] = tree["l3"]["d_emb"] = D_MODEL
    config = write_config(tmp_path / "config.yaml", tree)
    output = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(config), str(output)]
    result = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(output.read_text())
    table_mb = ROWS * D_MODEL * 4 / 2**20
    for rank, figures in report.items():
        # Its quarter: the shard plan balances rows to within a few percent of a quarter.
        assert figures["own_rows_mb"] <= 1.05 * table_mb / 4, (rank, figures)
        # +10%, plus the initialiser's working memory: a block of rows and its gathered part.
        working_mb = 2 * INIT_BLOCK_ROWS * D_MODEL * 4 / 2**20
        assert figures["deferred_mb"] <= 1.1 * (figures["own_rows_mb"] + figures["backbone_mb"]) + working_mb, (
            rank, figures)
        assert figures["whole_table_mb"] >= table_mb, (rank, figures)  # what it replaces


def _peak_growth_mb(build) -> tuple[object, float]:
    """(build(), growth of the peak resident set over the resident set before it, in MB)."""
    def kb(field: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    before = kb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
    built = build()
    return built, (kb("VmHWM:") - before) / 1024


def _worker(config_path: str, output: str) -> None:
    import gc

    import torch.distributed as dist

    from l3train.config import load_config, validate_for_world
    from l3train.distributed import init_distributed
    from l3train.model.build import build_model
    from l3train.parallel.parallelize import parallelize
    from l3train.parallel.state import initialize_parallel

    cfg = load_config(config_path)
    world = init_distributed()
    layout = validate_for_world(cfg, world.size)
    state = initialize_parallel(1)
    report = {}
    # The whole tables first: the first build also pays one-time costs (kernels, thread pools).
    for name, defer in (("whole_table_mb", False), ("deferred_mb", True)):
        def build(defer: bool = defer):
            model, allocation = build_model(cfg, defer_rows=defer)
            return parallelize(model, allocation, cfg, layout, state, world.device)

        parts, report[name] = _peak_growth_mb(build)
        report["backbone_mb"] = sum(p.numel() * p.element_size() for p in parts.model.parameters()) / 2**20
        report["own_rows_mb"] = sum(p.numel() * p.element_size() for p in parts.rows.params) / 2**20
        assert parts.rows is not None and parts.rows.plan.num_shards == 4
        del parts
        gc.collect()
    everyone = [None] * world.size
    dist.all_gather_object(everyone, report)
    if world.rank == 0:
        Path(output).write_text(json.dumps(dict(enumerate(everyone))))
    finish_worker()


if __name__ == "__main__":
    _worker(*sys.argv[1:])

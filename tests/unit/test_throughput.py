"""Throughput in peers' units (model FLOPs per token against a hand count, TFLOP/s per device,
MFU, peak memory) as the Monitor logs it, the benchmark's reading of it, and the optional
Weights & Biases logger (offline) with its one-line error when wandb is missing."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from l3train.config import config_from_dict
from l3train.errors import L3TrainError
from l3train.sizing.accounting import training_flops
from l3train.trainer.monitor import Monitor, StepStats
from l3train.trainer.throughput import device_peak_tflops, table_peak_tflops, throughput_scalars

# A model small enough to count by hand: d_model 4, 2 heads of 2, 1 KV head, SwiGLU 6, a
# vocabulary of 10, one block, one L³ layer (d_emb 4, d_up 8, tied keys/values), S = 8.
HAND = ["model.vocab_size=10", "model.d_model=4", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden_size=6", "model.max_seq_len=8", "data.seq_length=8", "l3.after_blocks=[0]",
        "l3.d_emb=4", "l3.d_up=8", "l3.allocation=unused.npz", "optimizer.warmup_steps=0"]
MEAN_ROWS = 2.5  # corpus mean d_t


def test_training_flops_match_a_hand_count():
    cfg = config_from_dict({}, HAND)
    # Block: q and o 4·(2·2) = 16 each, k and v 4·(1·2) = 8 each -> 48; SwiGLU 3·4·6 = 72;
    # two RMSNorms 2·4 = 8: 128. L³ layer without its rows: input norm 4, W_up 4·8 = 32, its
    # RMSNorm 8, W_mix (8 + 4)·4 = 48: 92. Final norm 4. Output projection 10·4 = 40; the
    # input embedding (10·4) is not counted. N = 128 + 92 + 4 + 40 = 264; 6N = 1584.
    # Attention 12·L·H·q·S = 12·1·2·2·8 = 384. L³ rows 6·d_t·(d_in + d_emb) = 6·2.5·8 = 120.
    flops = training_flops(cfg.model, cfg.l3, cfg.data.seq_length, MEAN_ROWS, cfg.moe)
    assert (flops.dense_params, flops.attention, flops.l3_rows) == (264, 384, 120)
    assert flops.per_token == 1584 + 384 + 120 == 2088

    # Tied embeddings: the one table is the output projection, still counted once: the same.
    tied = config_from_dict({}, [*HAND, "model.tie_embeddings=true"])
    assert training_flops(tied.model, tied.l3, 8, MEAN_ROWS, tied.moe).per_token == 2088
    # Untied keys and values (d_emb 4 apart from keys of 4): the same FLOPs, twice the row params.
    untied = config_from_dict({}, [*HAND, "l3.tied_kv=false"])
    assert training_flops(untied.model, untied.l3, 8, MEAN_ROWS, untied.moe).per_token == 2088

    # MoE in block 0 (4 experts of 3, top 2): the SwiGLU's 72 becomes a router 4·4 = 16 plus
    # two active experts 2·3·4·3 = 72: N = 264 - 72 + 88 = 280; 6N = 1680; + 384 + 120.
    moe = config_from_dict({}, [*HAND, "moe.blocks=[0]", "moe.num_experts=4", "moe.top_k=2",
                                "moe.expert_hidden_size=3"])
    assert training_flops(moe.model, moe.l3, 8, MEAN_ROWS, moe.moe).per_token == 1680 + 384 + 120

    # Dense (no L³ layer): N = 128 + 4 + 40 = 172; 6N = 1032; + 384.
    dense = config_from_dict({}, [*HAND, "l3.after_blocks=[]"])
    assert training_flops(dense.model, dense.l3, 8, moe=dense.moe).per_token == 1032 + 384


def test_mfu_is_model_tflops_over_the_peak_and_absent_without_one():
    # 2 ranks at 3e9 tokens/s in all: 1.5e9 per device × 2e5 FLOPs = 300 TFLOP/s per device.
    scalars = throughput_scalars(3e9, 2, 2e5, peak_tflops=1000.0)
    assert scalars["train/tokens_per_s_per_device"] == 1.5e9
    assert scalars["train/tflops_per_device"] == pytest.approx(300.0)
    assert scalars["train/mfu"] == pytest.approx(0.3)
    assert "train/mfu" not in throughput_scalars(3e9, 2, 2e5, peak_tflops=None)


def test_the_peak_comes_from_the_flag_or_the_gpu_table_and_not_on_cpu():
    cpu = torch.device("cpu")
    peak, source = device_peak_tflops(None, "fp32", cpu)
    assert peak is None and "training.peak_tflops" in source
    assert device_peak_tflops(2.5, "fp32", cpu) == (2.5, "training.peak_tflops")
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == 989.0
    assert table_peak_tflops("NVIDIA H100 PCIe", "bf16", tf32=False) == 756.0
    assert table_peak_tflops("NVIDIA H200", "bf16", tf32=False) == 989.0
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", tf32=False) == 312.0
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    assert table_peak_tflops("NVIDIA A100 80GB PCIe", "fp32", tf32=False) == 19.5
    assert table_peak_tflops("Tesla T4", "bf16", tf32=False) is None


def _steps(cfg, seconds: float) -> list[StepStats]:
    return [StepStats(step=step, loss=torch.tensor(5.0 - step), grad_norm=1.0, lr=1e-3, seconds=seconds,
                      l3_entropy={}, router=None, micro_batches=1) for step in range(1, cfg.training.steps + 1)]


def _monitor_run(cfg) -> list[dict]:
    monitor = Monitor(cfg, is_main=True, start_step=0, mean_rows_per_token=MEAN_ROWS)
    for stats in _steps(cfg, seconds=0.5):
        monitor.record(stats, elapsed=1.0)
    monitor.close()
    return [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_monitor_logs_throughput_in_peers_units(tmp_path, one_rank, capsys):
    # 2 steps of 4 sequences × 8 tokens in 0.5 s each: 64 tokens/s on one device; × 2088 FLOPs.
    common = [*HAND, "training.steps=2", "training.log_interval=1", "training.global_batch_size=4",
              "training.micro_batch_size=4"]
    cfg = config_from_dict({}, [*common, f"run_dir={tmp_path / 'cpu'}"])
    rows = _monitor_run(cfg)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[-1]["train/tokens_per_s"] == rows[-1]["train/tokens_per_s_per_device"] == 64
    assert rows[-1]["train/tflops_per_device"] == pytest.approx(64 * 2088 / 1e12)
    assert "train/mfu" not in rows[-1]  # CPU, no training.peak_tflops
    assert rows[-1]["train/peak_memory_gib"] > 0.01  # this process's VmHWM: tens of MiB at least
    out = capsys.readouterr().out
    assert "no MFU on cpu" in out and "6 × 0.000264M parameters" in out
    assert "64 tok/s | 64 tok/s/device 1.34e-07 TFLOP/s/device | peak_mem" in out
    assert not [line for line in out.splitlines() if line.startswith("step") and "MFU" in line]

    flagged = config_from_dict({}, [*common, f"run_dir={tmp_path / 'flag'}", "training.peak_tflops=1e-6"])
    rows = _monitor_run(flagged)
    assert rows[-1]["train/mfu"] == pytest.approx(64 * 2088 / 1e12 / 1e-6)  # 13.4%
    assert "MFU 13.4%" in capsys.readouterr().out


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb transaction log: a 7-byte header (":W&B", magic, version),
    then LevelDB log blocks of 32 KiB, each record a 7-byte header (CRC-32, length, type:
    1 full, 2 first, 3 middle, 4 last) and its bytes."""
    raw, position, block, records, parts = path.read_bytes(), 7, 32768, [], b""
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if kind == 0:
            break
        parts += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(parts)
            parts = b""
    return records


def test_wandb_offline_run_holds_the_logged_scalars(tmp_path, one_rank, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config_from_dict({}, [*HAND, "training.steps=2", "training.log_interval=1", "logging.wandb=true",
                                "logging.wandb_mode=offline", f"run_dir={tmp_path / 'run'}",
                                "training.peak_tflops=1e-6"])
    rows = _monitor_run(cfg)
    (log,) = (tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb")
    # wandb.finish() returns before W&B's own process has written everything: wait for the
    # run's last record ("exit").
    deadline = time.monotonic() + 60
    while True:
        records = []
        for data in _wandb_records(log):
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(data)
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        if record.WhichOneof("record_type") == "run":
            assert record.run.display_name == "run" and record.run.project == "l3train"
    assert [entry["_step"] for entry in history] == [1, 2]
    for entry, row in zip(history, rows):
        logged = {key: value for key, value in entry.items() if not key.startswith("_")}
        assert logged == pytest.approx({key: value for key, value in row.items() if key != "step"})
    assert {"train/tflops_per_device", "train/mfu", "train/peak_memory_gib"} <= set(history[-1])


def test_missing_wandb_is_one_line_at_start_up(monkeypatch, tmp_path):
    from l3train.train import main
    from l3train.trainer.wandb_logger import WandbLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(L3TrainError) as error:
        main(["--config", str(Path(__file__).parents[2] / "configs/tiny_dense.yaml"), "logging.wandb=true",
              f"run_dir={tmp_path}"])
    message = str(error.value)
    assert "\n" not in message and "pip install wandb" in message and "logging.wandb=false" in message
    cfg = config_from_dict({}, ["logging.wandb=true", f"run_dir={tmp_path}"])
    with pytest.raises(L3TrainError, match="pip install wandb"):
        WandbLogger(cfg)


def test_throughput_settings_are_validated():
    with pytest.raises(L3TrainError, match="training.peak_tflops: must be > 0"):
        config_from_dict({}, ["training.peak_tflops=0"])
    with pytest.raises(L3TrainError, match="logging.wandb_mode: must be one of online, offline, disabled"):
        config_from_dict({}, ["logging.wandb_mode=shared"])


def test_benchmark_reads_the_medians_after_warm_up(tmp_path):
    from l3train.benchmarks.training import WARMUP_STEPS, run_figures

    rows = [{"step": 0, "val/loss": 7.0}]
    rows += [{"step": step, "train/tokens_per_s": 100.0 * step, "train/tokens_per_s_per_device": 50.0 * step,
              "train/tflops_per_device": 0.5 * step, "train/peak_memory_gib": 1.0 + step}
             for step in range(1, WARMUP_STEPS + 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # Steps 4, 5, 6 count: medians at step 5; the peak memory is the run's largest.
    assert run_figures(tmp_path) == {"tokens_per_s": 500.0, "tokens_per_s_per_device": 250.0,
                                     "tflops_per_device": 2.5, "mfu": None, "peak_memory_gib": 7.0}
    # A turn's steps (the benchmark passes all but the turn's first): steps 2 and 3 only.
    assert run_figures(tmp_path, range(2, 4)) == {"tokens_per_s": 250.0, "tokens_per_s_per_device": 125.0,
                                                  "tflops_per_device": 1.25, "mfu": None, "peak_memory_gib": 4.0}


def test_benchmark_units_table_says_n_a_without_a_figure():
    from l3train.benchmarks.training import Throughput, units_rows

    known = Throughput("a.yaml", 2, runs=[{"tokens_per_s_per_device": 1000.0, "tflops_per_device": 0.0123,
                                           "mfu": 0.25, "peak_memory_gib": 1.5},
                                          {"tokens_per_s_per_device": 3000.0, "tflops_per_device": 0.0125,
                                           "mfu": 0.35, "peak_memory_gib": 2.5}])
    unknown = Throughput("b.yaml", 2, runs=[{"tokens_per_s_per_device": 1234.4, "tflops_per_device": 0.5,
                                             "mfu": None, "peak_memory_gib": None}])
    assert units_rows(2, {"L³": known, "dense": unknown}) == [
        "| 2 | L³ | 2,000 | 0.0124 | 30.0% | 2.00 |", "| 2 | dense | 1,234 | 0.5 | n/a | n/a |"]


def test_benchmark_report_keeps_the_sections_below_its_marker(tmp_path):
    from l3train.benchmarks.training import KEEP_MARKER, write_report

    path = tmp_path / "benchmarks.md"
    write_report(path, "# first\n")
    assert path.read_text() == "# first\n"
    path.write_text(path.read_text() + "\n" + KEEP_MARKER + "\n\n## by hand\nkept\n")
    write_report(path, "# second\n")
    assert path.read_text() == "# second\n\n" + KEEP_MARKER + "\n\n## by hand\nkept\n"


def test_exchange_benchmark_sizes_are_the_sharded_layers_hand_count():
    from l3train.benchmarks.exchange import exchange_sizes, floor_ms_per_micro_batch
    from l3train.config import load_config

    # tiny_l3 on 2 ranks: 16 sequences of 128 tokens per step → 8 per rank, 1,024 positions,
    # half of them served by the other rank; d_model 128, d_emb 128 (+ the entropy column).
    positions, sizes = exchange_sizes(load_config("configs/tiny_l3.yaml", []), 2)
    assert positions == 1024
    assert sizes == {"route sizes": {"rows": 1, "bytes": 8}, "route token ids": {"rows": 512, "bytes": 4096},
                     "positions out": {"rows": 512, "bytes": 512 * 128 * 4},
                     "outputs back": {"rows": 512, "bytes": 512 * 129 * 4}}
    figures = {"l3_layers": 2, "collectives": {name: {"median_ms": ms} for name, ms in
                                               zip(sizes, (0.1, 0.2, 0.5, 0.7))}}
    # The route once; per layer positions out and outputs back, forward and backward.
    assert floor_ms_per_micro_batch(figures) == pytest.approx(0.1 + 0.2 + 2 * 2 * (0.5 + 0.7))


def test_benchmark_ratio_interval_is_the_binomial_order_statistics():
    from l3train.benchmarks.training import median_interval, ratio_cell

    # n = 10: [x_(2), x_(9)] covers the median with probability 1 - 2·11/1024 = 97.9%; [x_(3), x_(8)]
    # only 89.1%. n = 8: 1 - 2·9/256 = 93.0% < 95%, so the full range (99.2%).
    assert median_interval([float(v) for v in range(10, 0, -1)]) == (2.0, 9.0)
    assert median_interval([float(v) for v in range(1, 9)]) == (1.0, 8.0)
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 1 - 2/32 = 93.8% even for the full range
    assert median_interval([0.5, 0.9, 0.7, 0.8, 0.6, 1.0]) == (0.5, 1.0)  # 96.9%
    assert median_interval(list(range(1, 101))) == (40, 61)  # n = 100: 96.5%; (41, 60) would give 94.3%
    turns = [0.91, 0.88, 0.79, 0.93, 0.86, 0.9, 0.85, 0.95, 0.84, 0.87]
    assert ratio_cell(turns) == "0.88× (0.84-0.93)"  # median 0.875
    assert ratio_cell([1.1, 1.3]) == "1.20×"

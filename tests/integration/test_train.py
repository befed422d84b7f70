"""End-to-end training: DeepSpeed ZeRO 0-3 over gloo, equality with one process, exact resume,
TensorBoard events, checkpoints and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from session_cache import build_once, session_shared_dir
from shared_runs import BF16_ZERO2, EQUIVALENCE_STEPS, zero_stage
from training_harness import REPO, assert_losses_close, metrics, run_expecting_error, run_trainer, trainer_env


@pytest.fixture(scope="module")
def reference_run(shared_runs):
    """One process, ZeRO-0: the session's tiny L³ run (12 steps, checkpoints at 6 and 12)."""
    run = shared_runs.get("tiny_l3")
    return run.run_dir, run.stdout, run.config


def test_single_process_trains_and_writes_everything(reference_run):
    run_dir, stdout, _ = reference_run
    losses = metrics(run_dir, "train/loss")
    assert sorted(losses) == list(range(1, 13))
    val = metrics(run_dir, "val/loss")
    assert sorted(val) == [0, 6, 12]
    assert val[12] < val[0] - 0.5, val  # learns, on real text
    assert "step     12/12 | loss" in stdout and "val_loss" in stdout
    assert "tok/s/device" in stdout and "TFLOP/s/device" in stdout and "no MFU on cpu" in stdout

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/tokens_per_s_per_device", "train/tflops_per_device", "train/peak_memory_gib",
            "l3/entropy_after_block_0"} <= tags
    assert "train/mfu" not in tags  # CPU without training.peak_tflops
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    assert events.Scalars("train/loss")[-1].value == pytest.approx(losses[12])

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000012"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000006", "step_00000012"]
    assert "after_blocks" in (checkpoints / "step_00000012" / "config.yaml").read_text()
    assert (run_dir / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_on_two_ranks_match_one_process(stage, shared_runs):
    """Same global batch on 2 gloo ranks: ZeRO 0-3 losses equal the single process (fp32, 1e-5)."""
    reference_dir = shared_runs.get("equivalence").run_dir
    run_dir = shared_runs.get("equivalence", *zero_stage(stage), nproc=2).run_dir
    losses = metrics(run_dir, "train/loss")
    assert losses[EQUIVALENCE_STEPS] < losses[1]
    assert_losses_close(losses, metrics(reference_dir, "train/loss"), rtol=1e-5)
    assert_losses_close(metrics(run_dir, "val/loss"), metrics(reference_dir, "val/loss"), rtol=1e-5)


@pytest.mark.slow
def test_bf16_trains_on_two_ranks(shared_runs):
    """bf16 under ZeRO-2: finite, falling losses close to (not equal to) the fp32 reference."""
    reference_dir = shared_runs.get("equivalence").run_dir
    run_dir = shared_runs.get("equivalence", *BF16_ZERO2, nproc=2).run_dir
    losses, reference = metrics(run_dir, "train/loss"), metrics(reference_dir, "train/loss")
    assert losses[EQUIVALENCE_STEPS] < losses[1] - 0.3
    assert all(abs(losses[s] - reference[s]) < 0.1 * reference[s] for s in reference)


@pytest.mark.slow
def test_resume_continues_the_uninterrupted_trajectory(shared_runs, tmp_path):
    """Stop after 5 steps (ZeRO-2, 2 ranks), resume: steps 6-20 equal an uninterrupted run."""
    whole = shared_runs.get("equivalence", *zero_stage(2), nproc=2)
    split = tmp_path / "split"
    common = [f"run_dir={split}", *zero_stage(2)]
    first = run_trainer(whole.config, *common, "--exit-after-steps", "5", nproc=2)
    assert "exiting after 5 steps" in first.stdout
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    second = run_trainer(whole.config, *common, "--resume", nproc=2)
    assert "resuming at step 5" in second.stdout
    expected = metrics(whole.run_dir, "train/loss")
    resumed = metrics(split, "train/loss")
    assert sorted(resumed) == list(range(1, EQUIVALENCE_STEPS + 1))  # the interrupted run's log continues, no duplicates
    assert resumed == expected  # bit-exact: same data, same RNG, same optimizer state
    events = EventAccumulator(str(split / "tensorboard"))
    events.Reload()
    assert sorted(e.step for e in events.Scalars("train/loss"))[-15:] == list(range(6, EQUIVALENCE_STEPS + 1))


def test_bad_configs_and_data_give_one_line(reference_run, tmp_path):
    _, _, config = reference_run
    assert "model.d_modle: unknown key" in run_expecting_error("--config", str(config), "model.d_modle=3")
    assert "training.steps: expected int" in run_expecting_error("--config", str(config), "training.steps=many")
    assert "config file" in run_expecting_error("--config", str(tmp_path / "missing.yaml"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    assert "not valid YAML" in run_expecting_error("--config", str(bad_yaml))
    missing_data = run_expecting_error("--config", str(config), f"run_dir={tmp_path / 'r1'}",
                                       f"data.prefixes=[{tmp_path / 'nothing'}]")
    assert "nothing" in missing_data and "preprocess_data.py" in missing_data
    corrupt = tmp_path / "corrupt"
    corrupt.with_suffix(".bin").write_bytes(b"\0" * 100)
    corrupt.with_suffix(".idx").write_bytes(b"garbage")
    message = run_expecting_error("--config", str(config), f"run_dir={tmp_path / 'r2'}", f"data.prefixes=[{corrupt}]")
    assert "corrupt" in message
    assert "allocation" in run_expecting_error("--config", str(config), f"run_dir={tmp_path / 'r3'}",
                                               f"l3.allocation={tmp_path / 'none.npz'}")
    assert not (tmp_path / "r1" / "checkpoints").exists()


def test_incompatible_checkpoint_is_refused(reference_run, tmp_path):
    reference_dir, _, config = reference_run
    message = run_expecting_error("--config", str(config), f"run_dir={reference_dir}", "model.n_layers=3",
                                  "--resume")
    assert "model.n_layers=2" in message and "new run_dir" in message


def test_stop_signal_saves_and_exits_for_requeue(reference_run, tmp_path):
    """SIGUSR1 mid-run: the step finishes, a checkpoint of that step is saved, exit status 75."""
    import signal
    import time

    reference_dir, _, config = reference_run
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "l3train.train", "--config", str(config), f"run_dir={run_dir}",
           "training.steps=400", "checkpoint.save_interval=1000"]
    process = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() or len(metrics(run_dir, "train/loss")) < 2:
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 75, stderr[-3000:]
    assert "stop signal (SIGUSR1)" in stdout
    stopped_at = max(metrics(run_dir, "train/loss"))
    assert stopped_at < 400
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"


def test_fresh_run_refuses_a_run_dir_with_checkpoints(reference_run):
    reference_dir, _, config = reference_run
    before = sorted(p.name for p in (reference_dir / "checkpoints").iterdir())
    message = run_expecting_error("--config", str(config), f"run_dir={reference_dir}")
    assert "already holds checkpoints" in message and "--resume" in message
    assert sorted(p.name for p in (reference_dir / "checkpoints").iterdir()) == before


def test_training_without_a_validation_split(reference_run, tmp_path):
    _, _, config = reference_run
    run_dir = tmp_path / "run"
    result = run_trainer(config, f"run_dir={run_dir}", "data.split=100,0,0", "training.steps=2")
    assert "validation is skipped" in result.stdout
    assert sorted(metrics(run_dir, "train/loss")) == [1, 2] and metrics(run_dir, "val/loss") == {}


def test_overrides_and_flags_come_in_any_order():
    from l3train.train import parse_args

    args = parse_args(["--config", "c.yaml", "run_dir=x", "--resume", "training.steps=600",
                       "--exit-after-steps", "3", "l3.after_blocks=[1]"])
    assert args.config == "c.yaml" and args.resume and args.exit_after_steps == 3
    assert args.overrides == ["run_dir=x", "training.steps=600", "l3.after_blocks=[1]"]


def test_the_readme_library_example_runs(reference_run, tmp_path):
    """README's ```python block, run as written except for its config and overrides (the test's
    tiny config, 2 steps), then one more step through `train_step` as its comment suggests."""
    import re

    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    _, _, config = reference_run
    run_dir = tmp_path / "run"
    script = block.replace('"configs/tiny_l3.yaml"', repr(str(config))).replace(
        '["training.steps=100"]', repr([f"run_dir={run_dir}", "training.steps=2", "training.log_interval=1"]))
    assert script != block and "Trainer(" in script
    script += ("\nassert status == 0 and trainer.step == 2\n"
               "trainer.cfg.training.steps = 3\n"
               "stats = trainer.train_step(trainer.batch(trainer.step))\n"
               "print('EXTRA_STEP', stats.step, float(stats.loss), stats.micro_batches)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=trainer_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(metrics(run_dir, "train/loss")) == [1, 2]
    step, loss, micro = result.stdout.split("EXTRA_STEP ")[1].split()
    assert step == "3" and 0 < float(loss) < 20 and micro == "2"  # 8 sequences in micro-batches of 4


# configs/tiny_l3.yaml on the quick start's data (launch/lib.sh build_quickstart_data, from
# this CPython's stdlib docstrings): the validation loss before training and the first train
# losses, as `bash launch/quickstart.sh` logs them. A change here changes the README's figures:
# make it on purpose, and regenerate those.
QUICK_START_VAL_LOSS_0 = 7.6522
QUICK_START_LOSSES = {1: 7.6547, 2: 7.6374, 3: 7.5944, 4: 7.5462, 5: 7.4503}


@pytest.fixture(scope="module")
def quickstart_data(tmp_path_factory) -> Path:
    def build(folder: Path) -> None:
        subprocess.run(["bash", "-c", 'source launch/lib.sh && build_quickstart_data "$0" "$1"', sys.executable,
                        str(folder)], cwd=REPO, env=trainer_env(), check=True, capture_output=True, timeout=600)

    return build_once(session_shared_dir(tmp_path_factory) / "quickstart_data", build)


def test_the_quick_start_trajectory_is_pinned(quickstart_data, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(REPO / "configs" / "tiny_l3.yaml", f"run_dir={run_dir}", "training.log_interval=1",
                f"data.prefixes=[{quickstart_data / 'indexed' / 'stdlib_docstrings_text_document'}]",
                f"data.tokenizer={quickstart_data / 'tokenizer' / 'spm_bpe_2048.model'}",
                f"l3.allocation={quickstart_data / 'allocation' / 'lzw_v32768_k128.npz'}",
                "--exit-after-steps", str(len(QUICK_START_LOSSES)))  # the 500-step schedule, stopped early
    losses = {step: round(loss, 4) for step, loss in metrics(run_dir, "train/loss").items()}
    assert round(metrics(run_dir, "val/loss")[0], 4) == QUICK_START_VAL_LOSS_0
    assert losses == QUICK_START_LOSSES

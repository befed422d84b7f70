"""SLURM acceptance: launch/slurm/pretrain.sbatch and launch/sweep.py on a real two-node cluster.

The session's one cluster (tests/conftest.py's `slurm_cluster`: launch/slurm/cluster.sh starts
munged, slurmctld and slurmd for nodes n1 and n2 on this machine; docs/cpu.md, SLURM section);
jobs are submitted with the real sbatch and run torchrun over gloo on both nodes. Checked: a
2-node run finishes with a checkpoint in its per-job run directory; a 3-point sweep finishes with its manifest; a job stopped
with SIGUSR1 saves, requeues itself and resumes from its checkpoint under the same job id;
a cancelled job saves and stays cancelled; a node starts the trainers it is told to, with
the job's CPUs shared among them, and GPUs that SLURM allocated but torch cannot see are
refused in one line (the trainers-per-node decision itself, from every SLURM variable, is
tests/unit/test_distributed.py's).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import Cluster, tail
from training_harness import metrics, tiny_l3_config, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(slurm_cluster: Cluster) -> Cluster:
    return slurm_cluster


@pytest.fixture
def tiny_config(tmp_path, tiny_corpus, tiny_allocation) -> dict:
    return tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation)


def test_two_node_job_trains_and_checkpoints(cluster, tiny_config, tmp_path):
    """No run_dir in the config: the job trains in <root>/runs/<config name>-<job id>."""
    del tiny_config["run_dir"]
    config = write_config(tmp_path / "tiny.yaml", tiny_config)
    log = tmp_path / "job.out"
    job_id = cluster.run("sbatch", "--parsable", "--nodes", "2", f"--output={log}", "launch/slurm/pretrain.sbatch",
                         str(config), "optimizer.lr=1.0e-3", L3TRAIN_ROOT=str(tmp_path),
                         L3TRAIN_PYTHON=sys.executable).strip()  # the README's words (its test names this one)
    record = cluster.wait(job_id, log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", tail(log)
    assert record["NodeList"] == "n[1-2]"
    assert "on 2 node(s) [n[1-2]], 1 process(es) per node" in text
    # No GPU and no CPU request: one trainer per node on the one CPU the job holds there.
    assert "per node: 1 trainer(s) (no GPU: one CPU trainer), 0 visible GPU(s), 1 CPU(s), OMP_NUM_THREADS=1" in text
    assert f"caches: datasets {os.environ['L3TRAIN_DATASET_CACHE']}, extensions " in text
    assert "network settings: none set" in text
    assert "rendezvous localhost:" in text  # the node record's NodeAddr, not the name n1
    assert "[l3train] 2 rank(s)" in text and "starting from scratch" in text
    assert "trainer exit statuses: 0 x2" in text and "training finished" in text
    run_dir = tmp_path / "runs" / f"tiny-{job_id}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert sorted(metrics(run_dir, "train/loss")) == list(range(1, 13))


def test_trainers_per_node_share_the_jobs_cpus(cluster, tiny_config, tmp_path):
    """Two trainers on one node (L3TRAIN_GPUS_PER_NODE; on a GPU node SLURM's GPU count) with
    --cpus-per-task=2: the training step gets both CPUs, one thread per trainer."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config)
    log = tmp_path / "job.out"
    job_id = cluster.sbatch("--nodes=1", "--cpus-per-task=2", f"--output={log}", "launch/slurm/pretrain.sbatch",
                            str(config), L3TRAIN_GPUS_PER_NODE="2", OMP_NUM_THREADS="")
    record = cluster.wait(job_id, log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", tail(log)
    assert "on 1 node(s)" in text and "2 process(es) per node" in text
    assert "per node: 2 trainer(s) (L3TRAIN_GPUS_PER_NODE), 0 visible GPU(s), 2 CPU(s), OMP_NUM_THREADS=1" in text
    assert "warning:" not in text
    assert "[l3train] 2 rank(s)" in text and "trainer exit statuses: 0 x2" in text
    assert (Path(tiny_config["run_dir"]) / "checkpoints" / "latest").read_text().strip() == "step_00000012"


def test_gpus_that_torch_cannot_see_are_refused(cluster, tiny_config, tmp_path):
    """SLURM says the node has 4 GPUs for the job (SLURM_GPUS_ON_NODE, as --gpus-per-node=4
    sets it), torch sees none: the job stops before starting any trainer, one error line last."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config)
    log = tmp_path / "job.out"
    job_id = cluster.sbatch("--nodes=1", f"--output={log}", "launch/slurm/pretrain.sbatch", str(config),
                            SLURM_GPUS_ON_NODE="4")
    record = cluster.wait(job_id, log)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", tail(log)
    assert lines[-1].startswith("error: SLURM allocated 4 GPU(s) per node (SLURM_GPUS_ON_NODE=4), but torch sees "
                                "none"), tail(log)
    assert "training step" not in text and not Path(tiny_config["run_dir"]).exists()


def test_sweep_of_three_learning_rates(cluster, tiny_config, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", tiny_config)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"configs": [str(config)], "grid": {"optimizer.lr": [1.0e-3, 3.0e-3, 1.0e-2]},
                                     "sbatch_args": ["--nodes=1"]}))
    study = tmp_path / "study"
    cluster.run(sys.executable, "launch/sweep.py", str(sweep), "--study-dir", str(study))
    runs = json.loads((study / "study.json").read_text())["runs"]
    assert [run["name"] for run in runs] == ["tiny-lr0.001", "tiny-lr0.003", "tiny-lr0.01"]
    assert len({run["job_id"] for run in runs}) == 3
    final_losses = []
    for run in runs:
        log = Path(run["log"].replace("%j", run["job_id"]))
        assert cluster.wait(run["job_id"], log)["JobState"] == "COMPLETED", tail(log)
        run_dir = Path(run["run_dir"])
        assert run_dir.parent == study
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == float(
            run["name"].removeprefix("tiny-lr"))
        final_losses.append(metrics(run_dir, "train/loss")[12])
    assert len(set(final_losses)) == 3, final_losses  # three different trainings


def test_trainer_error_is_the_logs_last_line(cluster, tiny_config, tmp_path):
    """A user error that only the trainers find (the job's up-front check parses the config but
    loads no tokenizer): each rank prints it and torchrun's failure report follows; the job
    repeats the error as the log's last line and exits 2."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config)
    log = tmp_path / "job.out"
    job_id = cluster.sbatch("--nodes=2", f"--output={log}", "launch/slurm/pretrain.sbatch", str(config),
                            "model.vocab_size=256")
    record = cluster.wait(job_id, log)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", tail(log)
    assert "trainer exit statuses: 2 x2" in text and "ChildFailedError" in text, tail(log)
    assert lines[-1].startswith("error: model.vocab_size=256 is smaller than the tokenizer's vocabulary"), tail(log)
    assert lines[-2].endswith("training failed; see the errors above"), tail(log)
    assert lines.count(lines[-1]) == 3  # once per rank, and again last


def submit_long_run(cluster, tiny_config: dict, tmp_path: Path, steps: int,
                    running_past_step: int) -> tuple[str, Path, Path]:
    """Submit a 2-node run of `steps` steps that checkpoints only at its end (logging every
    10 steps); return (job id, log, run dir) once it has logged step `running_past_step`."""
    tiny_config["training"].update(steps=steps, log_interval=10, eval_interval=steps)
    tiny_config["checkpoint"]["save_interval"] = steps
    config = write_config(tmp_path / "long.yaml", tiny_config)
    run_dir = Path(tiny_config["run_dir"])
    log = tmp_path / "job.out"
    job_id = cluster.sbatch("--nodes=2", f"--output={log}", "launch/slurm/pretrain.sbatch", str(config))
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or max(metrics(run_dir, "train/loss"), default=0) < running_past_step:
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING") and time.time() < deadline, tail(log)
        time.sleep(0.2)
    return job_id, log, run_dir


def test_stopped_job_requeues_and_resumes(cluster, tiny_config, tmp_path):
    """SIGUSR1 to the batch shell (as --signal=B:USR1 does before the time limit): the
    trainers save and exit 75, the job requeues itself and resumes from that checkpoint."""
    steps = 150  # signalled after step 20: the job is still busy when the signal arrives
    job_id, log, run_dir = submit_long_run(cluster, tiny_config, tmp_path, steps=steps, running_past_step=20)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    record = cluster.wait(job_id, log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", tail(log)
    assert record["Restarts"] == "1"
    assert "received SIGUSR1" in text and "trainer exit statuses: 75 x2" in text and "requeueing job" in text
    stopped_at = int(re.search(r"stop signal \(SIGUSR1\) at step (\d+)", text).group(1))
    resumed_at = int(re.search(r"resuming at step (\d+)", text).group(1))
    assert 20 <= stopped_at == resumed_at < steps
    assert "(restart 1)" in text and text.count("starting from scratch") == 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    # The log continues where the first attempt stopped: every interval once, no restart from 0.
    assert sorted(metrics(run_dir, "train/loss")) == list(range(10, steps + 1, 10))
    assert sorted(metrics(run_dir, "val/loss")) == [0, steps]


def test_cancelled_job_saves_and_stays_cancelled(cluster, tiny_config, tmp_path):
    """scancel sends SIGTERM: the trainers save and exit 75, but the job must not requeue
    itself (that would undo the cancel); the run resumes only when submitted again."""
    job_id, log, run_dir = submit_long_run(cluster, tiny_config, tmp_path, steps=2000, running_past_step=10)
    cluster.run("scancel", job_id)
    record = cluster.wait(job_id, log)  # CANCELLED at once; the shell goes on until the trainers exit
    deadline = time.time() + 60
    while "not requeueing" not in (text := log.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", tail(log)
    assert "received SIGTERM" in text and "not requeueing" in text and "requeued" not in text, tail(log)
    stopped_at = int(re.search(r"stop signal \(SIGTERM\) at step (\d+)", text).group(1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"


def test_preprocess_array_job_and_merge_give_the_one_process_dataset(cluster, tiny_corpus, tmp_path):
    """launch/slurm/preprocess.sbatch as an array of 2 tasks over 5 shards, resubmitted (the
    finished files are skipped), then merged; and launch/slurm/preprocess.sh submitting both."""
    import gzip

    from l3train.data.indexed import preprocess

    shards = tmp_path / "shards"
    shards.mkdir()
    documents = tiny_corpus.documents[:500]
    for index in range(5):
        lines = "".join(json.dumps({"text": doc}) + "\n" for doc in documents[100 * index:100 * (index + 1)])
        (shards / f"part-{index}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    one = tmp_path / "one"
    preprocess(shards, one, tiny_corpus.tokenizer_path, progress=False, log=lambda _line: None)
    args = ["--input", f"{shards}/part-*.jsonl.gz", "--tokenizer", str(tiny_corpus.tokenizer_path),
            "--output-prefix", str(tmp_path / "many")]
    env = {"L3TRAIN_PYTHON": sys.executable}

    def run_array(name: str) -> list[str]:
        job = cluster.sbatch("--array=0-1", f"--output={tmp_path}/{name}-%a.out", "launch/slurm/preprocess.sbatch",
                             *args, **env)
        for task in (0, 1):
            record = cluster.wait(f"{job}_{task}", tmp_path / f"{name}-{task}.out")
            assert record["JobState"] == "COMPLETED", tail(tmp_path / f"{name}-{task}.out")
        return [(tmp_path / f"{name}-{task}.out").read_text() for task in (0, 1)]

    first = run_array("first")
    assert "array task 0 of 2" in first[0] and "task 0 of 2: " in first[0] and "task 1 of 2: " in first[1]
    assert not (tmp_path / "many.bin").exists()
    again = run_array("again")  # every file of both tasks is done: nothing is tokenized again
    assert all(re.search(r"task \d of 2: .* \((\d+) of \1 chunk\(s\) done before\)", text) for text in again), again
    merge = cluster.sbatch(f"--output={tmp_path}/merge.out", "launch/slurm/preprocess.sbatch", "--merge-only", *args,
                           **env)
    assert cluster.wait(merge, tmp_path / "merge.out")["JobState"] == "COMPLETED", tail(tmp_path / "merge.out")
    assert "wrote " in (tmp_path / "merge.out").read_text()
    for suffix in (".bin", ".idx"):
        assert Path(f"{tmp_path}/many{suffix}").read_bytes() == Path(f"{one}{suffix}").read_bytes()

    # The submission script: the array, and the merge that waits for it.
    args[-1] = str(tmp_path / "submitted")
    printed = cluster.run("bash", "launch/slurm/preprocess.sh", "2", *args, L3TRAIN_PYTHON=sys.executable,
                          L3TRAIN_SBATCH_ARGS=f"--output={tmp_path}/submitted-%A_%a.out")
    merge_job = re.search(r"MERGE_JOB=(\d+)", printed).group(1)
    assert cluster.wait(merge_job, tmp_path / "x", timeout=240)["JobState"] == "COMPLETED", printed
    assert Path(f"{tmp_path}/submitted.bin").read_bytes() == Path(f"{one}.bin").read_bytes()

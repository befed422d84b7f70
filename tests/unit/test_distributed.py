"""The device decision (l3train.distributed.select_accelerator) and the launcher's node layout
(node_layout, what launch/slurm/pretrain.sbatch starts per node).

select_accelerator runs in fresh interpreters: DeepSpeed chooses its accelerator once per
process. GPUs are simulated there by replacing torch.cuda's queries (this machine has none),
which is all the decision reads; tools/gpu_check.sh runs the real thing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from training_harness import REPO, trainer_env

from l3train.distributed import NodeLayout, node_layout, select_accelerator
from l3train.errors import L3TrainError

FAKE_GPUS = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: {gpus}
torch.cuda.set_device = lambda index: print("set_device", index)
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**trainer_env(), **env},
                          capture_output=True, text=True, timeout=120)


def test_gpus_override_a_cpu_accelerator_left_in_the_environment():
    """The crash on GPU hosts: DS_ACCELERATOR=cpu from a launcher or harness while GPUs are
    visible. CUDA wins, DeepSpeed is told so, and local rank 0 says it in one line."""
    code = FAKE_GPUS.format(gpus=2) + """
import os
from l3train.distributed import select_accelerator
print(select_accelerator(), os.environ["DS_ACCELERATOR"])
"""
    result = run_python(code, DS_ACCELERATOR="cpu", LOCAL_RANK="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["set_device 0", "cuda:0 cuda"]
    assert result.stderr.strip() == "[l3train] DS_ACCELERATOR=cpu in the environment, but 2 GPU(s) are visible: DeepSpeed uses cuda"
    other = run_python(code, DS_ACCELERATOR="cpu", LOCAL_RANK="1")
    assert other.stdout.splitlines() == ["set_device 1", "cuda:1 cuda"] and other.stderr == ""  # once per node


def test_without_gpus_deepspeed_runs_on_the_cpu_whatever_the_environment_says():
    code = """
from l3train.distributed import select_accelerator
device = select_accelerator()
from deepspeed.accelerator import get_accelerator
print(device, get_accelerator().device_name())
"""
    result = run_python(code, DS_ACCELERATOR="cuda")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "cpu cpu"
    assert "[l3train] DS_ACCELERATOR=cuda in the environment, but no GPU is visible: DeepSpeed uses cpu" in result.stderr
    quiet = run_python(code, DS_ACCELERATOR="cpu")  # they agree: nothing to say
    assert quiet.stdout.splitlines()[-1] == "cpu cpu" and "[l3train]" not in quiet.stderr


def test_deepspeed_that_already_chose_another_device_is_refused():
    code = """
from deepspeed.accelerator import get_accelerator
get_accelerator()  # chosen from DS_ACCELERATOR=cuda before l3train decided
from l3train.distributed import select_accelerator
from l3train.errors import L3TrainError
try:
    select_accelerator()
except L3TrainError as err:
    print(err)
"""
    result = run_python(code, DS_ACCELERATOR="cuda")
    assert result.stdout.splitlines()[-1].startswith("DeepSpeed already runs on cuda, but this process trains on cpu")


def test_local_rank_beyond_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail(f"set_device({index}) called"))
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(L3TrainError) as error:
        select_accelerator()
    assert str(error.value) == ("LOCAL_RANK=2, but this node has 2 visible GPU(s) (CUDA_VISIBLE_DEVICES=0,1): "
                                "start at most 2 trainer(s) per node, one per GPU")
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # refused before DeepSpeed was touched


@pytest.mark.parametrize("environ,visible,expected", [
    # No GPU anywhere: one CPU trainer with every CPU of the node.
    ({"SLURM_CPUS_ON_NODE": "8"}, 0, NodeLayout(1, 8, "no GPU: one CPU trainer")),
    # --gres=gpu:8 or --gpus-per-node=8: SLURM_GPUS_ON_NODE, the CPUs shared out.
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96"}, 8, NodeLayout(8, 12, "SLURM_GPUS_ON_NODE")),
    # A typed --gpus-per-node without SLURM_GPUS_ON_NODE.
    ({"SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_ON_NODE": "2"}, 8, NodeLayout(4, 1, "SLURM_GPUS_PER_NODE")),
    ({"SLURM_GPUS_PER_NODE": "a100:2,v100:2", "SLURM_CPUS_ON_NODE": "16"}, 4, NodeLayout(4, 4, "SLURM_GPUS_PER_NODE")),
    # Whole nodes without GPU accounting: every visible GPU.
    ({"SLURM_CPUS_ON_NODE": "32"}, 4, NodeLayout(4, 8, "the visible GPUs")),
    # The explicit count wins, also for CPU ranks; OMP_NUM_THREADS when set.
    ({"L3TRAIN_GPUS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96"}, 8,
     NodeLayout(2, 48, "L3TRAIN_GPUS_PER_NODE")),
    ({"L3TRAIN_GPUS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2", "OMP_NUM_THREADS": "3"}, 0,
     NodeLayout(2, 3, "L3TRAIN_GPUS_PER_NODE")),
    # Fewer CPUs than trainers (the job asked for none): still one thread each.
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "1"}, 8, NodeLayout(8, 1, "SLURM_GPUS_ON_NODE")),
])
def test_node_layout_from_the_environment(environ, visible, expected):
    assert node_layout(environ, visible) == expected


@pytest.mark.parametrize("environ,visible,message", [
    ({"L3TRAIN_GPUS_PER_NODE": "8"}, 4,
     "8 trainers per node (L3TRAIN_GPUS_PER_NODE), but torch sees 4 GPU(s) on this node; start at most one trainer per GPU"),
    ({"SLURM_GPUS_ON_NODE": "8"}, 4, "8 trainers per node (SLURM_GPUS_ON_NODE), but torch sees 4 GPU(s)"),
    ({"SLURM_GPUS_ON_NODE": "4"}, 0, "SLURM allocated 4 GPU(s) per node (SLURM_GPUS_ON_NODE=4), but torch sees none"),
    ({"SLURM_GPUS_PER_NODE": "h100:many"}, 8, "SLURM_GPUS_PER_NODE='h100:many' is not a GPU count"),
    ({"L3TRAIN_GPUS_PER_NODE": "0"}, 8, "L3TRAIN_GPUS_PER_NODE='0' must be a positive number of trainers per node"),
    ({"SLURM_GPUS_ON_NODE": "0"}, 8, "SLURM_GPUS_ON_NODE gives 0 GPUs per node"),
    ({"OMP_NUM_THREADS": "all"}, 0, "OMP_NUM_THREADS='all' must be a positive number of threads"),
])
def test_node_layout_refusals(environ, visible, message):
    with pytest.raises(L3TrainError, match="^" + re.escape(message)):
        node_layout(environ, visible)


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    """Ports the kernel gives connections never collide with a rendezvous port drawn here."""
    import socket

    from l3train.distributed import _ephemeral_ports, free_port

    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # drawn, not one fixed port
    for port in ports:
        assert port not in _ephemeral_ports()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))

"""Shared test fixtures: a tiny real corpus, tokenizer and preprocessed dataset.

Tests train and load on real text (a slice of the default stdlib-docstring corpus), not
random tokens, so tokenizer, preprocessing and loss bugs show up. The whole fixture is
built once per session in a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from session_cache import build_once, session_shared_dir

# The suite tests the CPU paths, also on a GPU machine: GPUs are hidden from this process and
# every subprocess before anything imports torch, so the trainers choose the CPU themselves
# (l3train.distributed.select_accelerator) and DeepSpeed, imported here by some tests, agrees.
# tools/gpu_check.sh exercises the GPU paths.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DS_ACCELERATOR"] = "cpu"
# Reuse JIT-built DeepSpeed ops (~40-60 s each to compile) across test sessions instead of
# rebuilding them.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "l3train" / "torch_extensions")
)
Path(os.environ["TORCH_EXTENSIONS_DIR"]).mkdir(parents=True, exist_ok=True)

TINY_CORPUS_MB = 0.5
TINY_VOCAB = 512


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep megatron's sample-index caches of test datasets out of ~/.cache."""
    os.environ["L3TRAIN_DATASET_CACHE"] = str(tmp_path_factory.mktemp("dataset_cache"))


@dataclass(frozen=True)
class TinyCorpus:
    jsonl_path: Path  # ~0.5 MB prefix of the default corpus: {"text", "source"} per line
    text_path: Path  # the same documents, one per line (paragraph breaks become spaces)
    documents: tuple[str, ...] = field(repr=False)  # the texts in jsonl_path, in order
    tokenizer_path: Path  # sentencepiece BPE, vocab 512, trained on jsonl_path
    tokenizer_id: str
    vocab_size: int
    data_prefix: str  # jsonl_path preprocessed: <data_prefix>.bin/.idx


def _build_tiny_corpus(root: Path) -> None:
    from l3train.data.corpus import build_corpus
    from l3train.data.indexed import preprocess
    from l3train.data.tokenizer import iter_training_sentences, train_tokenizer

    build_corpus(root / "corpus.jsonl", max_mb=TINY_CORPUS_MB, progress=False)
    documents = _documents(root / "corpus.jsonl")
    (root / "corpus.txt").write_text("".join(doc.replace("\n", " ") + "\n" for doc in documents))
    tokenizer = train_tokenizer(iter_training_sentences(documents), root / "tokenizer", vocab_size=TINY_VOCAB)
    preprocess(root / "corpus.jsonl", str(root / "corpus"), tokenizer.path, progress=False, log=lambda _: None)


def _documents(jsonl_path: Path) -> tuple[str, ...]:
    return tuple(json.loads(line)["text"] for line in jsonl_path.read_text().splitlines())


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> TinyCorpus:
    from l3train.data.tokenizer import Tokenizer

    root = build_once(session_shared_dir(tmp_path_factory) / "tiny_corpus", _build_tiny_corpus)
    tokenizer = Tokenizer.load(root / "tokenizer.model")
    return TinyCorpus(
        jsonl_path=root / "corpus.jsonl",
        text_path=root / "corpus.txt",
        documents=_documents(root / "corpus.jsonl"),
        tokenizer_path=tokenizer.path,
        tokenizer_id=tokenizer.tokenizer_id,
        vocab_size=tokenizer.vocab_size,
        data_prefix=str(root / "corpus"),
    )


@pytest.fixture(scope="session")
def tiny_allocation(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: TinyCorpus) -> Path:
    """An LZW allocation (v = 8 rows per token on average, k = 64) of the tiny corpus, made by the CLI."""
    import subprocess
    import sys

    def build(folder: Path) -> None:
        subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "lzw_allocate.py"),
                        "--data-prefix", tiny_corpus.data_prefix, "--tokenizer", str(tiny_corpus.tokenizer_path),
                        "--eod-id", str(_eod_id(tiny_corpus)), "--mode", "lzw",
                        "--budget", str(8 * tiny_corpus.vocab_size), "--cap", "64",
                        "--output", str(folder / "allocation_lzw.npz")], check=True, capture_output=True)

    return build_once(session_shared_dir(tmp_path_factory) / "tiny_allocation", build) / "allocation_lzw.npz"


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: TinyCorpus, tiny_allocation: Path):
    """Training runs made once per session (tests/shared_runs.py), by whichever worker asks
    first; at the end, none of those this worker read may have changed."""
    from shared_runs import SharedRuns

    runs = SharedRuns(session_shared_dir(tmp_path_factory) / "shared_runs", tiny_corpus, tiny_allocation)
    yield runs
    changed = runs.changed()
    assert not changed, f"tests changed shared runs instead of copies of them: {changed}"


@pytest.fixture
def one_rank(tmp_path: Path):
    """A one-process gloo world in this test's process, for code that makes collectives (the
    monitor's reduction, the profiler's collective trace)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'gloo_store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def slurm_cluster():
    """The session's two-node SLURM cluster, started and stopped by the README's own command lines
    (tests/integration/test_readme.py names this fixture as what runs them)."""
    import subprocess

    from slurm_cluster import Cluster, slurm_unavailable

    if why := slurm_unavailable():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests: {why} (.ci/run installs slurm-wlm)")
        pytest.skip(f"{why}; CI runs the SLURM tests")
    repo = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "SLURM_CONF"}
    start = 'export "$(launch/slurm/cluster.sh start | tail -n 1)"'  # the README's lines, as written
    stop = 'launch/slurm/cluster.sh stop "$(dirname "$SLURM_CONF")"'
    started = subprocess.run(["bash", "-c", f'set -euo pipefail\n{start}\necho "$SLURM_CONF"'], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, f"cluster.sh start failed:\n{started.stderr}"
    cluster = Cluster(Path(started.stdout.strip().splitlines()[-1]))
    pids = cluster.live_pids()
    assert len(pids) == 4  # munged, slurmctld, slurmd n1 and n2
    assert cluster.run("sinfo", "-h", "-N", "-o", "%N %t").split() == ["n1", "idle", "n2", "idle"]
    try:
        yield cluster
    finally:
        stopped = subprocess.run(["bash", "-c", stop], cwd=repo, env={**env, "SLURM_CONF": str(cluster.conf)},
                                 capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0, stopped.stderr
        assert not cluster.directory.exists(), f"cluster.sh stop left {cluster.directory}"
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "cluster daemons still running"


SLURM_MODULES = ("test_readme.py", "test_slurm.py")  # they share the session's SLURM cluster
# Timed against the wall clock (a dead rank must end the job, the survivor naming it, before
# torchrun's grace period ends): run last, when the other worker has only unit tests left.
LAST_MODULES = ("test_failures.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules that use the SLURM cluster first: together they are the longest unit of work
    (see pytest_xdist_make_scheduler); LAST_MODULES last; the rest keep their order."""
    items.sort(key=lambda item: (item.path.name not in SLURM_MODULES, item.path.name in LAST_MODULES))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist (`-n 2`, pytest.ini) sends each test module whole to one worker, so that its
    module-scoped runs are made once, in collection order; the two SLURM modules go together
    (one cluster)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm" if module.endswith(SLURM_MODULES) else module

    return ModuleScheduling(config, log)


def _eod_id(corpus: TinyCorpus) -> int:
    from l3train.data.tokenizer import Tokenizer

    return Tokenizer.load(corpus.tokenizer_path).eod_id

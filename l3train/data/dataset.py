"""Training/validation datasets over preprocessed .bin/.idx files, and per-step batches.

Datasets are megatron-core `GPTDataset`s (blended with `BlendedDataset` when several
prefixes are given) built by `BlendedMegatronDatasetBuilder`, so sampling, splitting and
blending behave exactly as in Megatron-LM.

Batches are a pure function of (dataset, seed, step): step `s` uses the positions
`s*global_batch_size + arange(global_batch_size)` of an endless stream of samples, and data
parallel rank `r` takes the `r`-th contiguous slice. The training dataset holds exactly one
epoch of the training split (megatron's shuffle), whatever `training.steps` is: the number
of samples asked of megatron feeds its shuffle, so sizing it by the run's length would make
the order of every step depend on `training.steps`, and extending a run would change the
steps already taken. Epoch `e > 0` of the stream reads the same samples in a permutation
seeded by (seed, e). A resumed or extended run therefore sees exactly the samples it would
have seen, and the union over DP ranks is the single-process batch, without any sampler
state to checkpoint.

Megatron caches its sample indices on disk, and with `path_to_cache=None` it writes them
under `<prefix>/cache/` beside the user's data, keyed only by path and config: a
re-preprocessed file would silently reuse stale indices. Instead each build gets its own
directory under the dataset cache (`$L3TRAIN_DATASET_CACHE`, default
`~/.cache/l3train/datasets`), named by a hash of the data files' identity (path, size,
mtime) and of every setting that shapes the indices. Megatron sees the prefixes through
symlinks in that directory, so its cache lands there. A directory is used only once it
is marked complete; an interrupted build is discarded and redone. With several ranks,
rank 0 builds first (megatron's protocol) and the others load its indices, so the cache
must be on storage all ranks see (a shared home, or set $L3TRAIN_DATASET_CACHE).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from l3train.data.indexed import HOW_TO_FIX, check_indexed_dataset, read_meta
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError

# megatron.core.datasets.indexed_dataset.DType codes -> item sizes.
_COMPLETE = "COMPLETE"


class DataSettings(Protocol):
    """What `build_datasets` reads from the config's `data` section."""

    prefixes: list[str]
    weights: list[float] | None
    split: str
    seq_length: int
    tokenizer: str


class _MegatronTokenizer:
    """The few tokenizer attributes megatron's GPTDataset reads from its config.

    `eod` marks document ends; `pad = -1` (never a real id) is what megatron pads short
    validation samples with and masks out of the loss; `unique_identifiers` enters the
    hash megatron names its cached indices by, so it carries the tokenizer_id.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod_id
        self.eos = tokenizer.eod_id
        self.pad = -1
        self.unique_identifiers = {
            "class": "l3train.Tokenizer",
            "tokenizer_id": tokenizer.tokenizer_id,
        }


@contextlib.contextmanager
def _quiet_megatron() -> Iterator[None]:
    """Silence megatron-core's import-time Apex/TE warnings and its dataset log notices.

    Without logging configured, Python prints megatron's WARNING records such as "Cannot
    save the BlendedDataset indexes because path_to_cache is None", which is expected
    here (see the module docstring) and would only alarm users.
    """
    logger = logging.getLogger("megatron.core.datasets")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def dataset_cache_root() -> Path:
    """Where built sample indices are cached (`$L3TRAIN_DATASET_CACHE` overrides)."""
    configured = os.environ.get("L3TRAIN_DATASET_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "l3train" / "datasets"


def check_tokenizer_matches(prefix: str, tokenizer: Tokenizer) -> None:
    meta = read_meta(prefix)
    if meta and meta.get("tokenizer_id") != tokenizer.tokenizer_id:
        raise L3TrainError(
            f"dataset {prefix} was tokenized with tokenizer {meta.get('tokenizer_id')} "
            f"({meta.get('tokenizer')}), but data.tokenizer {tokenizer.path} is "
            f"{tokenizer.tokenizer_id}; point data.tokenizer at the right model or "
            f"{HOW_TO_FIX.format(prefix=prefix)} --tokenizer {tokenizer.path}"
        )


def parse_split(split: str) -> list[float]:
    try:
        parts = [float(p) for p in str(split).split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise L3TrainError(
            f"data.split {split!r} must be up to three non-negative train,valid,test "
            f"proportions with train > 0, e.g. \"98,2,0\""
        )
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def _split_tokens(prefix: str, lengths: np.ndarray, split: list[float]) -> list[int]:
    """Tokens of each split (train, valid, test) of one prefix; every non-empty split must
    get some.

    Megatron splits each prefix by document with the same rounding as here; a split
    that ends up with no tokens would make it loop forever looking for samples.
    """
    bounds = np.concatenate([[0.0], np.cumsum(split)])
    n, tokens = len(lengths), []
    for name, fraction, lo, hi in zip(("train", "valid", "test"), split, bounds[:-1], bounds[1:]):
        begin, end = int(round(lo * n)), int(round(hi * n))
        tokens.append(int(lengths[begin:end].sum()))
        if fraction > 0 and tokens[-1] == 0:
            raise L3TrainError(
                f"dataset {prefix} has {n} documents; its {name} split ({fraction:.1%}) gets "
                f"none. Use more data or change data.split"
            )
    return tokens


def _cache_key(prefixes: list[str], fields: dict[str, Any]) -> str:
    identity = []
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            path = Path(f"{prefix}{suffix}").resolve()
            stat = path.stat()
            identity.append([str(path), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"files": identity, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _prepare_cache_dir(cache_dir: Path, prefixes: list[str]) -> None:
    """Create (or reuse, if complete) `cache_dir` with symlinks `data<i>.bin/.idx`."""
    if cache_dir.exists() and not (cache_dir / _COMPLETE).exists():
        shutil.rmtree(cache_dir)  # an interrupted build: its index files may be partial
    cache_dir.mkdir(parents=True, exist_ok=True)
    for i, prefix in enumerate(prefixes):
        for suffix in (".bin", ".idx"):
            link = cache_dir / f"data{i}{suffix}"
            if not link.is_symlink():
                link.symlink_to(Path(f"{prefix}{suffix}").resolve())


def _checked_inputs(
    data: DataSettings, train_samples: int | None, valid_samples: int
) -> tuple[list[str], list[float] | None, list[float], Tokenizer, int]:
    """Prefixes, blend weights (None for one dataset), split fractions, tokenizer and the
    training samples to build (one epoch when `train_samples` is None) of `data`, every
    file checked before megatron sees it."""
    prefixes = [str(p) for p in data.prefixes]
    if not prefixes:
        raise L3TrainError(
            "data.prefixes is empty: give at least one preprocessed dataset prefix"
        )
    weights = None if data.weights is None else [float(w) for w in data.weights]
    if weights is not None and (len(weights) != len(prefixes) or any(w <= 0 for w in weights)):
        raise L3TrainError(
            f"data.weights {data.weights} must be {len(prefixes)} positive numbers, one per "
            f"prefix (or null for equal weights)"
        )
    if data.seq_length < 1:
        raise L3TrainError(f"data.seq_length must be positive, got {data.seq_length}")
    if (train_samples is not None and train_samples < 1) or valid_samples < 0:
        raise L3TrainError(
            f"need train_samples >= 1 and valid_samples >= 0, got {train_samples}, {valid_samples}"
        )
    split = parse_split(data.split)
    if not data.tokenizer:
        raise L3TrainError(
            "data.tokenizer is not set: give the sentencepiece .model used for preprocessing"
        )
    tokenizer = Tokenizer.load(data.tokenizer)
    epoch = 0
    for prefix in prefixes:
        _, lengths = check_indexed_dataset(prefix)
        train_tokens = _split_tokens(prefix, lengths, split)[0]
        check_tokenizer_matches(prefix, tokenizer)
        # One epoch as megatron counts it: a sample reads seq_length + 1 tokens, neighbours share one.
        epoch += max(1, (train_tokens - 1) // data.seq_length)
    if len(prefixes) == 1:
        weights = None  # a one-dataset "blend" is just that dataset
    elif weights is None:
        # Equal weights, as data.weights documents; megatron's None would weight by size.
        weights = [1.0] * len(prefixes)
    return prefixes, weights, split, tokenizer, epoch if train_samples is None else train_samples


def _gpt_dataset_config(staged: list[str], weights: list[float] | None, split: list[float], seed: int,
                        seq_length: int, tokenizer: Tokenizer) -> Any:
    with _quiet_megatron():
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(staged, weights),
        # Fixed-point: megatron parses the split with a [.0-9]+ regex (no exponents).
        split=",".join(f"{p:.12f}" for p in split),
        # None: GPTDataset caches under <staged prefix>/cache/ (inside cache_dir) and
        # BlendedDataset builds its small index in memory on every rank; a path here
        # would make BlendedDataset call get_rank() even without a process group.
        path_to_cache=None,
        tokenizer=_MegatronTokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # Models here apply causal masking themselves; a [1, s, s] mask per sample is waste.
        create_attention_mask=False,
    )


def build_datasets(
    data: DataSettings, seed: int, valid_samples: int, train_samples: int | None = None
) -> tuple[Any, Any]:
    """Build the (train, valid) datasets; valid is None when the split gives it nothing.
    The training dataset holds `train_samples`, or one epoch of the training split (summed
    over the blend's prefixes) when None: what the trainer asks, so that the data order
    does not depend on the run's length.

    `data` is any object with `prefixes`, `weights`, `split`, `seq_length`, `tokenizer`.
    Each dataset yields dicts with `tokens` and `labels` (LongTensor[seq_length], labels
    are tokens shifted by one) and `loss_mask`. Call on every rank when a process group
    is initialized (megatron synchronizes the ranks inside).
    """
    prefixes, weights, split, tokenizer, train_samples = _checked_inputs(data, train_samples, valid_samples)
    with _quiet_megatron():
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    settings = {
        "seed": seed,
        "seq_length": data.seq_length,
        "split": split,
        "weights": weights,
        "samples": [train_samples, valid_samples],
        "tokenizer_id": tokenizer.tokenizer_id,
    }
    cache_dir = dataset_cache_root() / _cache_key(prefixes, settings)
    if rank == 0:
        _prepare_cache_dir(cache_dir, prefixes)
    if distributed:
        torch.distributed.barrier()  # the symlinks must exist before any rank opens them
    staged = [str(cache_dir / f"data{i}") for i in range(len(prefixes))]
    config = _gpt_dataset_config(staged, weights, split, seed, data.seq_length, tokenizer)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    )
    with _quiet_megatron():
        train_ds, valid_ds, _ = builder.build()
    if rank == 0:
        (cache_dir / _COMPLETE).touch()
    return train_ds, valid_ds


@functools.lru_cache(maxsize=2)
def _epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def sample_index(position: int, size: int, seed: int) -> int:
    """The dataset index at `position` of the endless sample stream: epoch 0 is the dataset
    in order (megatron's shuffle), epoch e > 0 a permutation of it seeded by (seed, e)."""
    epoch, offset = divmod(position, size)
    return offset if epoch == 0 else int(_epoch_permutation(size, seed, epoch)[offset])


def batch_for_step(
    dataset: Any, step: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """This DP rank's share of the global batch for `step`, as stacked tensors (positions past
    the dataset's end continue in later epochs, see `sample_index`).

    Returns `tokens`, `labels` (LongTensor[b, seq]) and `loss_mask` (FloatTensor[b, seq])
    with b = global_batch_size // dp_size.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise L3TrainError(f"invalid data-parallel rank {dp_rank} of {dp_size}")
    if global_batch_size % dp_size:
        raise L3TrainError(
            f"global batch size {global_batch_size} is not divisible by the {dp_size} "
            f"data-parallel ranks"
        )
    size = len(dataset)
    if size == 0:
        raise L3TrainError("the dataset is empty: nothing to draw batches from")
    local = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * local
    samples = [dataset[sample_index(first + i, size, seed)] for i in range(local)]
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]).long(),
        "labels": torch.stack([s["labels"] for s in samples]).long(),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
    }

"""The default training corpus: docstrings of the running Python's standard library.

l3train's main command has to work on a fresh machine that can reach nothing but package
registries, and it has to train on real text (random tokens hide tokenizer, data and
loss bugs). Every Python installation ships megabytes of carefully written English prose
in its standard library docstrings, so the corpus is built from those: no download, no
licence question beyond Python's own, and deterministic for a given Python version.

Each module, class and function docstring is one document. Paragraphs are kept (one per
line) but whitespace inside a paragraph is collapsed, because docstring indentation and
hard line wraps are layout, not content. Files are visited in sorted order and every
step is deterministic, so the same Python version always yields byte-identical output.

Corpora are read back (in every format the data tools accept) by l3train.data.sources.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_path, atomic_write_text

# Test suites are mostly fixtures, not prose; installed third-party packages would make
# the corpus depend on what happens to be installed, not on the Python version.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
# Shorter docstrings are mostly one-liners like "Return self==value." repeated across
# hundreds of methods; they add tokens but little language.
MIN_CHARS = 80

_BLANK_LINE = re.compile(r"\n\s*\n")
_WHITESPACE = re.compile(r"\s+")


@dataclass
class CorpusStats:
    """What a corpus build produced; also written to the sidecar `.meta.json` file."""

    documents: int
    characters: int
    bytes: int
    files_parsed: int
    files_skipped: int
    duplicates_dropped: int
    truncated_by_max_mb: bool
    python_version: str
    python_implementation: str
    stdlib: str
    sha256: str
    seconds: float

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6


def default_stdlib_dir() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def meta_path(jsonl_path: str | os.PathLike) -> Path:
    """The sidecar recording how a corpus was built: `corpus.jsonl.meta.json`.

    The full name is kept so it cannot clash with the `<prefix>.meta.json` that
    preprocessing writes when the data prefix is the corpus name without `.jsonl`.
    """
    path = Path(jsonl_path)
    return path.with_name(path.name + ".meta.json")


def normalize_docstring(text: str) -> str:
    """Collapse whitespace inside each paragraph; keep paragraphs, one per line."""
    paragraphs = (_WHITESPACE.sub(" ", p).strip() for p in _BLANK_LINE.split(text))
    return "\n".join(p for p in paragraphs if p)


def iter_source_files(stdlib: Path) -> Iterator[Path]:
    """Yield the stdlib's `.py` files in a deterministic (sorted) order."""
    for root, dirs, files in os.walk(stdlib):
        # Sorting in place also fixes the order os.walk descends in.
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(root) / name


def module_name(path: Path, stdlib: Path) -> str:
    """Dotted module name of a stdlib file: `json/decoder.py` -> `json.decoder`."""
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def iter_docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """Yield `(qualname, raw docstring)` for the module and every class/function in it.

    Definitions nested in `if`/`try` blocks count too (the stdlib defines many
    platform-specific functions that way); the qualname only grows at class and
    function boundaries, like Python's own `__qualname__`.
    """
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}.{child.name}"
                child_doc = ast.get_docstring(child, clean=True)
                if child_doc:
                    yield qualname, child_doc
                yield from visit(child, qualname)
            else:
                yield from visit(child, prefix)

    yield from visit(tree, module)


def _parse_source(path: Path) -> ast.Module | None:
    """The syntax tree of a stdlib file, or None when it cannot be parsed."""
    try:
        with warnings.catch_warnings():
            # Old stdlib modules trigger SyntaxWarnings (invalid escapes); noise here.
            warnings.simplefilter("ignore")
            return ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None


class _CorpusWriter:
    """Appends docstrings to the open JSONL file, dropping short and repeated ones and
    stopping at the size cap; keeps the counts and hash that `CorpusStats` reports."""

    def __init__(self, out: TextIO, cap: int | None) -> None:
        self.out = out
        self.cap = cap
        self.documents = self.characters = self.size = 0
        self.parsed = self.skipped = self.duplicates = 0
        self.truncated = False
        self.seen: set[str] = set()
        self.digest = hashlib.sha256()

    def add_file(self, path: Path, module: str) -> None:
        """Write the file's docstrings, stopping once the size cap is reached."""
        tree = _parse_source(path)
        if tree is None:
            # A few stdlib files are deliberately unparsable (lib2to3 fixtures, py2).
            self.skipped += 1
            return
        self.parsed += 1
        for source, raw in iter_docstrings(tree, module):
            self._add_document(normalize_docstring(raw), source)
            if self.truncated:
                return

    def _add_document(self, text: str, source: str) -> None:
        if len(text) < MIN_CHARS:
            return
        # Re-exported and copy-pasted docstrings recur; one copy is enough.
        if text in self.seen:
            self.duplicates += 1
            return
        line = json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
        encoded = line.encode("utf-8")
        if self.cap is not None and self.size + len(encoded) > self.cap:
            self.truncated = True
            return
        self.seen.add(text)
        self.out.write(line)
        self.digest.update(encoded)
        self.documents += 1
        self.characters += len(text)
        self.size += len(encoded)


def build_corpus(
    output: str | os.PathLike,
    max_mb: float | None = None,
    stdlib: str | os.PathLike | None = None,
    progress: bool = True,
) -> CorpusStats:
    """Write the stdlib-docstring corpus as JSONL (`{"text", "source"}` per line).

    `max_mb` caps the JSONL size in megabytes (10^6 bytes); the build stops before the
    document that would exceed it, so a capped corpus is a prefix of the full one.
    The JSONL and its `.meta.json` sidecar are written atomically.
    """
    if max_mb is not None and max_mb <= 0:
        raise L3TrainError(f"--max-mb must be positive, got {max_mb}")
    stdlib_dir = Path(stdlib) if stdlib is not None else default_stdlib_dir()
    if not stdlib_dir.is_dir():
        raise L3TrainError(f"standard library directory not found: {stdlib_dir}")
    cap = None if max_mb is None else int(max_mb * 1e6)
    start = time.monotonic()
    output = Path(output)
    files = list(iter_source_files(stdlib_dir))
    bar = tqdm(files, desc="corpus", unit="file", disable=not progress)
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        writer = _CorpusWriter(out, cap)
        for path in bar:
            writer.add_file(path, module_name(path, stdlib_dir))
            if writer.truncated:
                break
            bar.set_postfix(docs=writer.documents, MB=f"{writer.size / 1e6:.2f}", refresh=False)
        bar.close()
        if writer.documents == 0:
            # Raised inside the atomic block so no empty corpus file is left behind.
            raise L3TrainError(
                f"no documents found under {stdlib_dir} "
                f"(or --max-mb {max_mb} is smaller than one document)"
            )
    stats = CorpusStats(
        documents=writer.documents,
        characters=writer.characters,
        bytes=writer.size,
        files_parsed=writer.parsed,
        files_skipped=writer.skipped,
        duplicates_dropped=writer.duplicates,
        truncated_by_max_mb=writer.truncated,
        python_version=platform.python_version(),
        python_implementation=platform.python_implementation(),
        stdlib=str(stdlib_dir),
        sha256=writer.digest.hexdigest(),
        seconds=round(time.monotonic() - start, 2),
    )
    atomic_write_text(meta_path(output), json.dumps(asdict(stats), indent=2) + "\n")
    return stats

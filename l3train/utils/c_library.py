"""Small C helpers compiled on first use (the LZW trie, the CPU row-attention kernel).

Each is compiled with the system C compiler (`$CC`, else cc or gcc) into a cache directory
(`$L3TRAIN_CACHE`, default `~/.cache/l3train`), under a name keyed by a hash of its source,
its flags and, for flags that target this CPU (`-march=native`), the CPU's feature list:
a cache shared by unlike nodes (a home directory on a cluster) never hands one node a
library built for another's instruction set. It is built to a temporary file and renamed,
so concurrent ranks or test workers never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_path

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("L3TRAIN_CACHE") or Path.home() / ".cache" / "l3train")


def find_compiler(what: str, alternative: str = "") -> list[str]:
    """The C compiler command; errors say that `what` needs one, and offer `alternative`."""
    configured = os.environ.get("CC")
    candidates = [shlex.split(configured)] if configured else [["cc"], ["gcc"]]
    for command in candidates:
        if command and shutil.which(command[0]):
            return command
    looked_for = f"$CC={configured!r}" if configured else "cc, gcc"
    raise L3TrainError(f"no C compiler found (looked for {looked_for}); {what} compiles a small C helper on "
                       f"first use: install gcc (e.g. `apt-get install gcc`){alternative}")


def _cpu_features() -> str:
    """This CPU's feature flags (Linux), for libraries built with -march=native."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def load_c_library(source: Path, flags: tuple[str, ...], what: str, alternative: str = "") -> ctypes.CDLL:
    """`source` compiled with `flags` (once per source, flags and CPU) and loaded; `what` names
    the helper in errors ("the fast LZW scanner"), `alternative` ends the missing-compiler
    error (", or use ...")."""
    with _lock:
        if source in _loaded:
            return _loaded[source]
        compiler = find_compiler(what, alternative)
        text = source.read_bytes()
        target = _cpu_features() if "-march=native" in flags else ""
        digest = hashlib.sha256(text + repr((compiler, flags, target)).encode()).hexdigest()
        library_path = cache_dir() / f"{source.stem.lstrip('_')}-{digest[:16]}.so"
        if not library_path.exists():
            try:
                with atomic_path(library_path) as tmp:
                    result = subprocess.run([*compiler, *flags, "-o", str(tmp), str(source)],
                                            capture_output=True, text=True)
                    if result.returncode != 0:
                        raise L3TrainError(f"compiling {what} with `{shlex.join(compiler)}` failed: "
                                           f"{result.stderr.strip()[-500:]}")
            except OSError as err:
                raise L3TrainError(f"cannot build {what} in {library_path.parent} ({err}); "
                                   "set L3TRAIN_CACHE to a writable directory") from err
        library = ctypes.CDLL(str(library_path))
        _loaded[source] = library
        return library

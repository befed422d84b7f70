"""The manifest that makes a checkpoint verifiable: written last, checked before loading.

`manifest.json` records the step, hashes of the config, of the L³ allocation and of the
shard plan's token ownership, the world layout, and for every file of the checkpoint its
size and CRC-32. CRC-32 (zlib) runs at several GB/s and catches the failures that matter
here (overwritten, truncated or missing bytes); it is not meant to resist tampering. The
checksumming is split over the ranks (`files[rank::world]`), which also fsyncs each file,
so a large checkpoint costs each rank only its share of reading.

A checkpoint without a manifest is incomplete by definition: the manifest is the last
file written before the directory is renamed into place.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "l3train-checkpoint"
FORMAT_VERSION = 1
_CHUNK = 8 << 20


def checksum(path: Path, sync: bool = False) -> dict[str, Any]:
    """{"size", "crc32"} of the file at `path`; with `sync`, also fsync it (it was just written)."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        if sync:
            os.fsync(handle.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def checkpoint_files(directory: Path) -> list[str]:
    """Every file under `directory` but the manifest, as sorted relative paths."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")
                  if path.is_file() and path.name != MANIFEST)


def read_manifest(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, what is wrong with it)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None, f"{path} is missing (an incomplete checkpoint, or one written before l3train had manifests)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{path} is unreadable ({type(err).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return None, f"{path} is not an l3train checkpoint manifest"
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, f"{path} has format version {manifest.get('format_version')}, this l3train reads {FORMAT_VERSION}"
    return manifest, None


def file_problem(directory: Path, name: str, expected: dict[str, Any], full: bool = True) -> str | None:
    """What is wrong with file `name` of the checkpoint (None if it matches the manifest);
    without `full`, only its presence and size are checked (no reading)."""
    path = directory / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path} has {size} bytes, the manifest records {expected['size']} (truncated or overwritten)"
    if full:
        actual = checksum(path)["crc32"]
        if actual != expected["crc32"]:
            return f"{path} has CRC-32 {actual}, the manifest records {expected['crc32']} (corrupted)"
    return None


def verify(directory: Path, share: int = 0, shares: int = 1, full: bool = True) -> str | None:
    """The first problem with the checkpoint in `directory` (None if it verifies), checking
    the files `share::shares` of its manifest; the manifest itself is read by everyone."""
    manifest, problem = read_manifest(directory)
    if problem:
        return problem
    names = sorted(manifest["files"])[share::shares]
    for name in names:
        problem = file_problem(directory, name, manifest["files"][name], full)
        if problem:
            return problem
    return None


def write_manifest(directory: Path, header: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    """Write the manifest of `directory` (fsynced; the directory is renamed into place after)."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **header, "files": dict(sorted(files.items()))}
    path = directory / MANIFEST
    with open(path, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())

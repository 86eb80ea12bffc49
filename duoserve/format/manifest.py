"""The checkpoint manifest (sha256 and size of every file) and atomic folder writes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from duoserve.errors import CheckpointError, InputError
from duoserve.format.schema import MANIFEST_NAME


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict:
    """Hash every regular file of `folder` (recursively) into duoserve-manifest.json."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"manifest_version": 1, "files": files}
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def verify_manifest(folder: Path) -> dict:
    """Check every file the manifest lists: present, same size, same sha256. Returns the manifest."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME}; this is not a complete duoserve checkpoint")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    for rel, entry in files.items():
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{f}: size {f.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        if sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupted or modified)")
    return manifest


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless overwrite is set (before any work starts)."""
    if out.exists() and not overwrite:
        raise InputError(f"output folder {out} already exists; pass --overwrite to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` in one rename.

    A crash or an exception leaves `out` as it was (absent or the old version) and removes the
    temporary folder, so readers never see a half-written checkpoint.
    """
    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.writing-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

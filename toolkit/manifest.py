"""The run manifest ``armor_manifest.json``: what a compression run was, what it read, what it wrote — and the one
check that a directory holds a finished, unaltered run (:func:`verify_run`).

``armor-ref compress`` writes the manifest into its output directory before its first other write, rewrites it each
time a block is finished, and writes it a last time, with ``"complete": true``, after every other output file::

    {
      "format": "armor-run", "version": 1, "complete": true,
      "settings": {"method": "armor-hessian", "block_size": 32, ...},      # everything that determines the output
      "inputs":   {"model_dir": "/abs/path", "calibration": "/abs/calib.txt",
                   "sha256": {"config.json": "…", "model-00001-of-00002.safetensors": "…", ...,
                              "calibration text": "…"}},
      "outputs":  {"model-block-00000.safetensors": "<sha256>", ..., "model.safetensors.index.json": "…",
                   "config.json": "…", "armor_report.json": "…"},
      "progress": {...}                                                    # only while the run is unfinished
    }

Who checks it:

* ``compress --resume`` (:mod:`toolkit.compress`): the directory must hold a manifest (it never writes into a
  directory that is not one of its runs), with the same settings and the same input hashes; the files it resumes
  from must match their recorded hashes.
* ``eval``, ``inspect`` and the model loader call :func:`verify_run` before they trust a directory: a compressed
  directory must hold a *complete* manifest and every output file must match its hash (edited values, swapped
  index codes, truncated or replaced shards are all caught). A directory with neither a manifest nor ARMOR tensors
  (a dense checkpoint) passes through.

This module depends only on :mod:`toolkit.files` and :mod:`toolkit.errors`, so any loader can call it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ArmorError
from .files import file_sha256, read_safetensors_header, write_json

MANIFEST_FILE = "armor_manifest.json"
MANIFEST_FORMAT = "armor-run"
MANIFEST_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def new_manifest(settings: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a run that has written nothing yet."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "complete": False,
        "settings": settings,
        "inputs": inputs,
        "outputs": {},
    }


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``directory``; ``None`` when it has none; :class:`ArmorError` when it is not one of ours."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArmorError(f"{path} is unreadable ({err})", "compress the model again into a new directory") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArmorError(f"{path} is not an armor-ref run manifest", "compress the model again into a new directory")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ArmorError(
            f"{path} has version {manifest.get('version')!r}; this armor-ref reads version {MANIFEST_VERSION}",
            "compress the model again with this version",
        )
    for key, kind in (("complete", bool), ("settings", dict), ("inputs", dict), ("outputs", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArmorError(f"{path} has no valid {key!r} entry", "compress the model again into a new directory")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    write_json(Path(directory) / MANIFEST_FILE, manifest)


def hash_files(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of files of ``directory`` (names relative to it)."""
    return {name: file_sha256(Path(directory) / name) for name in sorted(names)}


def mismatched_files(directory: str | os.PathLike, recorded: dict[str, str]) -> list[str]:
    """Names in ``recorded`` whose file is missing or whose sha256 differs from the record."""
    bad = []
    for name, digest in sorted(recorded.items()):
        path = Path(directory) / name
        if not path.is_file() or file_sha256(path) != digest:
            bad.append(name)
    return bad


def holds_armor_weights(directory: str | os.PathLike) -> bool:
    """True when a weights file of the directory was written by ``armor-ref compress`` (its safetensors header says
    ``format=armor``). A compressed model saved by transformers' ``save_pretrained`` holds ARMOR tensors in files
    of transformers' own format: no run wrote it, so there is no manifest to expect (it is checked as any model)."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        files = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    else:
        files = [WEIGHTS_FILE]
    for name in files:
        path = directory / str(name)
        if path.is_file() and read_safetensors_header(path)[1].get("format") == "armor":
            return True
    return False


def verify_run(directory: str | os.PathLike, files: Iterable[str] | None = None) -> dict[str, Any] | None:
    """Check that ``directory`` holds a finished, unaltered ``armor-ref compress`` run before anything trusts it.

    Returns the manifest when it does, ``None`` for a directory that holds no run and no ARMOR weights (a dense
    checkpoint), and raises :class:`ArmorError` (exit 2) naming the problem otherwise: ARMOR weights without a
    manifest, an unfinished run (killed, out of disk space, or still running), a missing output file, or one whose
    bytes differ from the sha256 the run recorded. ``files``: check only these output names (e.g. the one shard
    ``inspect`` was given); names the run did not write are ignored.

    Call it first in every reader of compressed directories: ``eval``, ``inspect``, and the model loader."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if holds_armor_weights(directory):
            raise ArmorError(
                f"{directory} holds ARMOR weights but no {MANIFEST_FILE}: it is not a finished armor-ref compress run",
                "compress the model again (armor-ref compress --resume finishes an interrupted run)",
            )
        return None
    if not manifest["complete"]:
        raise ArmorError(
            f"{directory} holds an unfinished compression run (interrupted, out of disk space, or still running)",
            "finish it with the same armor-ref compress command plus --resume",
        )
    outputs: dict[str, str] = manifest["outputs"]
    if files is not None:
        wanted = {os.path.normpath(name) for name in files}
        outputs = {name: digest for name, digest in outputs.items() if os.path.normpath(name) in wanted}
    bad = mismatched_files(directory, outputs)
    if bad:
        state = "is missing" if not (directory / bad[0]).is_file() else "differs from what the run wrote (sha256)"
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise ArmorError(
            f"{directory / bad[0]} {state}{more}: the compressed model was changed after it was written",
            "compress the model again into a new directory",
        )
    return manifest


def verify_file(path: str | os.PathLike) -> None:
    """:func:`verify_run` for one file, when its directory holds a run manifest (a shard written by ``compress``):
    the run is finished and the file matches its recorded sha256. Files elsewhere are not checked (nothing recorded
    them)."""
    path = Path(path)
    if (path.parent / MANIFEST_FILE).is_file():
        verify_run(path.parent, files=[path.name])

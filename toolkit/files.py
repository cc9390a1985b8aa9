"""Files on disk: the one atomic writer, the one safetensors writer and reader, JSON, hashes.

Every file the toolkit writes goes through :func:`atomic_write`: the bytes go to a temporary file in the same
directory, are flushed to the disk (``fsync``), and only then renamed over the target (``os.replace``, atomic on
POSIX), and the directory entry is synced too. A crash, a kill or a full disk therefore leaves either the old file
or the new one, never a half-written file that a later step could trust (at worst a temporary ``.NAME.XXXXXXXX.tmp``
file that a kill left behind, which :func:`remove_temporary_files` clears). A failed write is an
:class:`~toolkit.errors.ArmorError` with exit code 1 naming the file.

Fault injection (tests only): every durable step — filling a temporary file, renaming it over its target, removing
a file — first calls :func:`fault_point`, which calls ``FAULTS.hook`` when one is set. ``tests/test_faults.py`` sets
it to raise ``ENOSPC`` or to record the disk at that moment; ``ARMOR_FAULT_INJECTION=kill:N`` (or ``enospc:N``) in
the environment makes the N-th step (counted from 1) end the process with ``os._exit(137)`` (or raise ``ENOSPC``).

Safetensors layout (https://github.com/huggingface/safetensors), which :func:`read_safetensors_header` parses itself
so that it can decode bfloat16 (NumPy has no such type) and tell a truncated file from one that is not safetensors::

    8 bytes      little-endian uint64 n: the length of the JSON header
    n bytes      JSON: {"NAME": {"dtype": "F16", "shape": [d_out, d_in], "data_offsets": [begin, end]}, ...,
                        "__metadata__": {"key": "value", ...}}        (offsets relative to the data section)
    rest         the data section: every tensor's bytes, little-endian, C (row-major) order

:func:`write_safetensors` writes deterministic bytes (tensors in name order, the header's keys sorted), tensor by
tensor (a shard is never assembled in memory), from NumPy arrays or torch tensors (bfloat16 included).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EXIT_FAILURE, ArmorError, os_error_message

# safetensors dtype name -> NumPy dtype of the stored bytes (BF16 is decoded to float32 after reading)
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_NAMES = {dtype.newbyteorder("="): name for name, dtype in SAFETENSORS_DTYPES.items() if name != "BF16"}
_TORCH_NAMES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


# ----------------------------------------------------------------------------------------------------------
# Fault injection (tests only)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class FaultInjection:
    """``hook(stage, path)`` is called before every durable step (``stage`` is ``"write"``, ``"rename"`` or
    ``"remove"``); ``steps`` counts the steps taken so far in this process."""

    hook: Callable[[str, Path], None] | None = None
    steps: int = 0


def _hook_from_environment(spec: str) -> Callable[[str, Path], None] | None:
    """``kill:N``: end the process (``os._exit(137)``, like SIGKILL: no cleanup) before the N-th step;
    ``enospc:N``: raise ``ENOSPC`` at the N-th step."""
    mode, _, count = spec.partition(":")
    if mode not in ("kill", "enospc") or not count.isdigit():
        return None
    target = int(count)

    def hook(stage: str, path: Path) -> None:
        if FAULTS.steps != target:
            return
        if mode == "kill":
            os._exit(137)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return hook


FAULTS = FaultInjection(_hook_from_environment(os.environ.get("ARMOR_FAULT_INJECTION", "")))


def fault_point(stage: str, path: str | os.PathLike) -> None:
    """Count one durable step and let the test hook (if any) fail it; a no-op in normal runs."""
    FAULTS.steps += 1
    if FAULTS.hook is not None:
        FAULTS.hook(stage, Path(path))


# ----------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------
TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_failed(path: str | os.PathLike, err: OSError) -> ArmorError:
    """The one-line error (exit 1) for a write that the system refused: disk full, permissions, ..."""
    return ArmorError(
        f"cannot write {path} ({os_error_message(err)})",
        "free disk space or fix the permissions, then run the command again",
        exit_code=EXIT_FAILURE,
    )


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` atomically: ``write(fh)`` fills an open temporary file in the same directory, which is then
    flushed, synced and renamed over ``path``. On any failure the temporary file is removed and ``path`` is left as
    it was. Raises :class:`ArmorError` when the directory does not exist, and (exit code 1) when the system refuses
    the write (disk full, permissions)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ArmorError(f"output directory {directory} does not exist", "create it or choose another output path")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_failed(path, err) from None
    tmp = Path(tmp_name)
    try:
        fault_point("write", path)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes the file private (0600); use the usual mode
        fault_point("rename", path)
        os.replace(tmp, path)
    except OSError as err:
        raise write_failed(path, err) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(directory)


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the bytes of ``source`` to ``target`` atomically."""
    with open(source, "rb") as src:
        atomic_write(target, lambda fh: shutil.copyfileobj(src, fh, 1 << 20))


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree (nothing when it is absent); a durable step for fault injection."""
    path = Path(path)
    if not path.exists():
        return
    fault_point("remove", path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_temporary_files(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``directory``; return their names."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and TEMPORARY_NAME.match(p.name))
    for name in names:
        (directory / name).unlink()
    return names


def write_json(path: str | os.PathLike, data: object) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def read_text(path: str | os.PathLike, what: str) -> str:
    """The contents of a UTF-8 text file; :class:`ArmorError` naming ``what`` when it is missing, empty, or not
    text (invalid UTF-8, NUL bytes: a binary file given by mistake)."""
    path = Path(path)
    if not path.is_file():
        raise ArmorError(f"{what} {path} does not exist", "check the path")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ArmorError(
            f"{what} {path} is not UTF-8 text (invalid byte at offset {err.start})", "give a plain text file"
        ) from None
    if "\x00" in text:
        raise ArmorError(f"{what} {path} holds NUL bytes: a binary file, not text", "give a plain text file")
    if not text.strip():
        raise ArmorError(f"{what} {path} is empty", "give a text file with enough words")
    return text


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Safetensors: writing
# ----------------------------------------------------------------------------------------------------------
def _tensor_payload(tensor: Any) -> tuple[str, list[int], Any]:
    """``(dtype name, shape, C-ordered little-endian bytes as a buffer)`` of a NumPy array or a torch tensor."""
    if isinstance(tensor, np.ndarray) or not hasattr(tensor, "detach"):
        array = np.ascontiguousarray(tensor)
        name = _NUMPY_NAMES.get(array.dtype.newbyteorder("="))
        if name is None:
            raise ValueError(f"dtype {array.dtype} cannot be stored in safetensors")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return name, list(array.shape), memoryview(array.reshape(-1)).cast("B")
    import torch

    t = tensor.detach().cpu().contiguous()
    name = _TORCH_NAMES.get(str(t.dtype))
    if name is None:
        raise ValueError(f"dtype {t.dtype} cannot be stored in safetensors")
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    return name, list(t.shape), memoryview(data)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, object]) -> None:
    """Write ``tensors`` (NumPy arrays or torch tensors) and string ``metadata`` as one safetensors file, atomically.

    Deterministic bytes: tensors in name order, header keys sorted, metadata values stringified (JSON for non-strings);
    tensors are written one at a time, C-contiguous in their logical order (a transposed view is written as what it
    shows, not as its memory)."""
    payloads = {name: _tensor_payload(tensors[name]) for name in sorted(tensors)}
    header: dict[str, Any] = {
        "__metadata__": {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in sorted(metadata.items())}
    }
    offset = 0
    for name, (dtype, shape, data) in payloads.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)

    def write(fh: Any) -> None:
        fh.write(struct.pack("<Q", len(head)) + head)
        for _, _, data in payloads.values():
            fh.write(data)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# Safetensors: reading
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: its safetensors dtype name, shape and absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _not_safetensors(path: Path) -> ArmorError:
    return ArmorError(f"{path} is not a safetensors file", "pass a .safetensors file")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors listed in a safetensors file and its metadata, every entry checked against the file's size: a
    missing, truncated, malformed or non-safetensors file is an :class:`ArmorError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ArmorError(f"file not found: {path}", "check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise _not_safetensors(path)
        (header_len,) = struct.unpack("<Q", f.read(8))
        first = f.read(1)
        if first != b"{" or header_len > MAX_HEADER_BYTES:
            raise _not_safetensors(path)
        if 8 + header_len > size:
            raise ArmorError(
                f"{path} is truncated (its header runs past the end of the file)", "copy or write the file again"
            )
        try:
            header = json.loads(first + f.read(header_len - 1))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _not_safetensors(path) from None
    if not isinstance(header, dict):
        raise _not_safetensors(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _not_safetensors(path)
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ArmorError(
                f"{path}: tensor {name!r} has an unsupported or malformed header entry",
                "re-save the file with the safetensors library",
            ) from None
        count = int(np.prod(shape, dtype=np.int64))
        if begin < 0 or end - begin != count * dtype.itemsize or min(shape, default=0) < 0:
            raise ArmorError(
                f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}",
                "re-save the file with the safetensors library",
            )
        if data_start + end > size:
            raise ArmorError(
                f"{path} is truncated (tensor {name!r} runs past the end of the file)", "copy or write the file again"
            )
        infos[name] = TensorInfo(entry["dtype"], shape, data_start + begin, data_start + end)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode bfloat16 values given as their uint16 bit patterns: bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole safetensors file: ``({name: array}, metadata)``, validated as in
    :func:`read_safetensors_header`. F64/F32/F16 come back as stored; BF16 is decoded to float32; integer and bool
    tensors are passed through. Arrays are writable native-order copies."""
    infos, metadata = read_safetensors_header(path)
    tensors: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, info in infos.items():
            f.seek(info.begin)
            array = np.frombuffer(f.read(info.end - info.begin), dtype=SAFETENSORS_DTYPES[info.dtype])
            array = array.reshape(info.shape)
            if info.dtype == "BF16":
                array = bfloat16_to_float32(array)
            tensors[name] = array.astype(array.dtype.newbyteorder("="))
    return tensors, metadata

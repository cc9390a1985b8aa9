"""Files in and out: safetensors weights, calibration data, and the exported ARMOR format (spec §6).

Safetensors layout (https://github.com/huggingface/safetensors), which :func:`read_safetensors` parses
itself so that it can decode bfloat16 (NumPy has no such type) and tell a truncated file from one that is not
safetensors::

    8 bytes      little-endian uint64 n: the length of the JSON header
    n bytes      JSON: {"NAME": {"dtype": "F16", "shape": [d_out, d_in], "data_offsets": [begin, end]}, ...,
                        "__metadata__": {"key": "value", ...}}        (offsets relative to the data section)
    rest         the data section: every tensor's bytes, little-endian, C (row-major) order

Calibration (:func:`load_calibration`), always reduced to a Gram matrix ``H = Xᵀ X`` in float64:

* ``.npy``: activations ``X`` (N, d_in); used for every 2-D weight whose input dimension ``shape[1]`` is d_in.
* ``.npz`` / ``.safetensors`` keyed by tensor name: ``NAME`` holds activations (N, d_in) for tensor ``NAME``;
  ``NAME.gram`` holds a precomputed Gram matrix ``XᵀX`` (d_in, d_in).

Exported ARMOR file (:func:`save_armor`, :func:`load_armor`), for every factorized tensor ``NAME``
(d_out, d_in) with block size ``b``::

    NAME.armor.A       float32 (d_out/b, b, b)   blocks of the left block-diagonal factor (row scales in)
    NAME.armor.B       float32 (d_in/b, b, b)    blocks of the right block-diagonal factor (column scales in)
    NAME.armor.values  float32 (d_out, d_in/2)   per group of 4 columns, the 2 kept core values, column order
    NAME.armor.index   uint8   (d_out, d_in/4)   per group, p0 | (p1 << 2) with 0 <= p0 < p1 <= 3

    metadata: format=armor, version, block_size, proxy, values_dtype, plus init, schedule, sweeps, ...

so that ``Ŵ = blockdiag(A) · S · blockdiag(B)``. Tensors that were not factorized are stored under their own
names.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
from safetensors.numpy import save_file

from .errors import InputError
from .factorization import ArmorResult
from .masks import GROUP, KEEP, has_two_per_group, pack_2of4, unpack_2of4

ARMOR_FORMAT = "armor"
ARMOR_VERSION = "1"
ARMOR_SUFFIXES = (".armor.A", ".armor.B", ".armor.values", ".armor.index")
GRAM_SUFFIX = ".gram"
GRAM_CHUNK_ROWS = 4096  # activations are turned into float64 this many rows at a time

# safetensors dtype name -> NumPy dtype of the stored bytes (BF16 is decoded to float32 after reading)
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
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
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


# ----------------------------------------------------------------------------------------------------------
# Safetensors
# ----------------------------------------------------------------------------------------------------------
def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode bfloat16 values given as their uint16 bit patterns: bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: ``({name: array}, metadata)``.

    F64/F32/F16 come back as stored; BF16 is decoded to float32; integer and bool tensors are passed through.
    Raises :class:`InputError` for a missing file, a file that is not safetensors, or a truncated one.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}", "check the path")
    size = path.stat().st_size
    not_safetensors = InputError(f"{path} is not a safetensors file", "pass a .safetensors file")
    with open(path, "rb") as f:
        if size < 8:
            raise not_safetensors
        (header_len,) = struct.unpack("<Q", f.read(8))
        first = f.read(1)
        if first != b"{" or header_len > _MAX_HEADER_BYTES:
            raise not_safetensors
        if 8 + header_len > size:
            raise InputError(
                f"{path} is truncated (its header runs past the end of the file)",
                "copy or download the file again",
            )
        try:
            header = json.loads(first + f.read(header_len - 1))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise not_safetensors from None
        if not isinstance(header, dict):
            raise not_safetensors
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise not_safetensors
        data_start = 8 + header_len
        tensors: dict[str, np.ndarray] = {}
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise InputError(
                    f"{path}: tensor {name!r} has an unsupported or malformed header entry",
                    "re-save the file with the safetensors library",
                ) from None
            count = int(np.prod(shape, dtype=np.int64))
            if end - begin != count * dtype.itemsize or begin < 0:
                raise InputError(
                    f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}",
                    "re-save the file with the safetensors library",
                )
            if data_start + end > size:
                raise InputError(
                    f"{path} is truncated (tensor {name!r} runs past the end of the file)",
                    "copy or download the file again",
                )
            f.seek(data_start + begin)
            array = np.frombuffer(f.read(end - begin), dtype=dtype).reshape(shape)
            if info["dtype"] == "BF16":
                array = bfloat16_to_float32(array)
            tensors[name] = array.astype(array.dtype.newbyteorder("="))  # a writable native-order copy
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` to a safetensors file, atomically: a temporary file in the same directory is written
    first and renamed over ``path`` only once complete, so a failure never leaves a partial file behind.
    Arrays are made C-contiguous first (a transposed view must be written in its logical order)."""
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    _write_atomically(Path(path), lambda tmp: save_file(arrays, str(tmp), metadata=meta))


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write ``data`` as indented JSON, atomically (see :func:`write_safetensors`)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _write_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, write) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"output directory {directory} does not exist", "create it or choose another -o path")
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes the file private (0600); use the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------
def gram_from_activations(X: np.ndarray, source: str) -> np.ndarray:
    """``H = Xᵀ X`` in float64 for activations ``X`` (N, d_in), accumulated over chunks of rows so that no
    float64 copy of the whole of ``X`` is made (``X`` may be a memory map). Rejects NaN/Inf."""
    d_in = X.shape[1]
    H = np.zeros((d_in, d_in))
    for start in range(0, X.shape[0], GRAM_CHUNK_ROWS):
        chunk = np.asarray(X[start : start + GRAM_CHUNK_ROWS], dtype=np.float64)
        if not np.all(np.isfinite(chunk)):
            raise InputError(f"calibration {source} contains NaN or Inf values", "drop or fix those rows")
        H += chunk.T @ chunk
    return H


def _check_numeric(array: np.ndarray, source: str) -> None:
    if array.dtype.kind not in "fiu":
        raise InputError(
            f"calibration {source} has dtype {array.dtype}, not a number type",
            "store activations as a float array",
        )


def _check_input_dim(name: str, weight: np.ndarray, d_in: int, source: str) -> None:
    if weight.ndim != 2 or weight.shape[1] != d_in:
        raise InputError(
            f"calibration {source} has dimension {d_in} but tensor {name!r} has shape {weight.shape}",
            "give activations whose width is the tensor's input dimension (shape[1])",
        )


def _read_npy(path: Path) -> np.ndarray:
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(
            f"cannot read calibration file {path} ({err})",
            "save activations with numpy.save as a 2-D float array (N, d_in)",
        ) from None
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        shape = getattr(X, "shape", "?")
        raise InputError(
            f"calibration file {path} holds an array of shape {shape}, not (N, d_in)",
            "save the activations as a 2-D array, one row per token",
        )
    _check_numeric(X, str(path))
    return X


def _read_keyed(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError) as err:
        raise InputError(
            f"cannot read calibration file {path} ({err})",
            "save it with numpy.savez, one array per tensor name",
        ) from None


def _short_list(names: Mapping[str, object] | list[str], limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def load_calibration(
    path: str | os.PathLike, weights: Mapping[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, int | None]]:
    """Calibration Gram matrices for the tensors of ``weights``: ``{name: (H, n_tokens)}``.

    ``H = XᵀX`` is float64 (d_in, d_in); ``n_tokens`` is the number of activation rows, or None where the
    file gave a Gram matrix directly. Formats (see the module docstring): ``.npy`` activations (N, d_in), used
    for every 2-D tensor with ``shape[1] == d_in`` (tensors of another width get no entry); ``.npz`` or
    ``.safetensors`` with keys ``NAME`` (activations) or ``NAME.gram`` (a Gram matrix). Keys naming no tensor
    of ``weights`` are ignored. Raises :class:`InputError` on unreadable files, NaN/Inf, mismatched
    dimensions, or when no tensor of ``weights`` gets calibration.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}", "check the --calib path")
    result: dict[str, tuple[np.ndarray, int | None]] = {}
    if path.suffix == ".npy":
        X = _read_npy(path)
        d_in = X.shape[1]
        matching = [name for name, w in weights.items() if w.ndim == 2 and w.shape[1] == d_in]
        if not matching:
            widths = sorted({int(w.shape[1]) for w in weights.values() if w.ndim == 2})
            raise InputError(
                f"calibration {path} has dimension {d_in} but no 2-D tensor has that input dimension (found {widths})",
                "give activations of the layer's input, shape (N, d_in)",
            )
        H = gram_from_activations(X, str(path))
        return {name: (H, int(X.shape[0])) for name in matching}
    if path.suffix not in (".npz", ".safetensors"):
        raise InputError(
            f"calibration file {path} has an unknown format",
            "use .npy activations, or .npz/.safetensors keyed by tensor name",
        )
    arrays = _read_keyed(path)
    for key, array in arrays.items():
        name = key[: -len(GRAM_SUFFIX)] if key.endswith(GRAM_SUFFIX) else key
        if name not in weights:
            continue
        source = f"{path}[{key}]"
        if name in result:
            raise InputError(f"calibration {path} has both {name!r} and {name + GRAM_SUFFIX!r}", "keep only one")
        _check_numeric(array, source)
        if key.endswith(GRAM_SUFFIX):
            if array.ndim != 2 or array.shape[0] != array.shape[1]:
                raise InputError(
                    f"calibration {source} has shape {array.shape}, not a square Gram matrix",
                    "store XᵀX of shape (d_in, d_in)",
                )
            _check_input_dim(name, weights[name], array.shape[0], source)
            H = np.asarray(array, dtype=np.float64)
            if not np.all(np.isfinite(H)):
                raise InputError(f"calibration {source} contains NaN or Inf values", "recompute the Gram matrix")
            if not np.allclose(H, H.T, rtol=1e-5, atol=1e-8 * float(np.max(np.abs(H), initial=0.0))):
                raise InputError(f"calibration {source} is not symmetric", "store XᵀX of shape (d_in, d_in)")
            result[name] = ((H + H.T) / 2, None)
        else:
            if array.ndim != 2:
                raise InputError(
                    f"calibration {source} has shape {array.shape}, not (N, d_in)",
                    "store activations as a 2-D array, one row per token",
                )
            _check_input_dim(name, weights[name], array.shape[1], source)
            result[name] = (gram_from_activations(array, source), int(array.shape[0]))
    if not result:
        raise InputError(
            f"calibration {path} has no key naming any of the tensors {_short_list(weights)}",
            "key activations by tensor name (NAME or NAME.gram)",
        )
    return result


# ----------------------------------------------------------------------------------------------------------
# The ARMOR file: writing
# ----------------------------------------------------------------------------------------------------------
def armor_tensors(name: str, result: ArmorResult) -> dict[str, np.ndarray]:
    """The four exported arrays of one factorized tensor (spec §6), C-contiguous."""
    values, index = pack_2of4(result.S, result.M)
    return {
        name + ".armor.A": np.ascontiguousarray(result.A, dtype=np.float32),
        name + ".armor.B": np.ascontiguousarray(result.B, dtype=np.float32),
        name + ".armor.values": np.ascontiguousarray(values, dtype=np.float32),
        name + ".armor.index": np.ascontiguousarray(index, dtype=np.uint8),
    }


def save_armor(
    path: str | os.PathLike,
    results: Mapping[str, ArmorResult],
    passthrough: Mapping[str, np.ndarray],
    metadata: Mapping[str, object] | None = None,
) -> None:
    """Write factorized tensors in the exported format of spec §6, plus ``passthrough`` tensors under their
    own names (biases, norms, anything not factorized). ``metadata`` adds header entries (stringified); the
    fixed keys ``format``, ``version``, ``block_size``, ``proxy``, ``values_dtype``, ``index_layout`` and
    ``tensors`` always win. All results must share one block size. The file is written atomically (temporary
    file, then rename)."""
    block_sizes = {r.block_size for r in results.values()}
    proxies = sorted({r.proxy for r in results.values()})
    if len(block_sizes) > 1:
        raise ValueError(f"all tensors of one file need the same block size, got {sorted(block_sizes)}")
    tensors: dict[str, np.ndarray] = {}
    for name, result in results.items():
        tensors.update(armor_tensors(name, result))
    for name, array in passthrough.items():
        if name in tensors or name in results:
            raise ValueError(f"passthrough tensor {name!r} clashes with a factorized tensor's name")
        tensors[name] = np.ascontiguousarray(array)
    header = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    header.update(
        format=ARMOR_FORMAT,
        version=ARMOR_VERSION,
        block_size=str(block_sizes.pop() if block_sizes else 0),
        proxy=",".join(proxies),
        values_dtype="float32",
        index_layout="p0 | (p1 << 2), 0 <= p0 < p1 <= 3, per group of 4 columns",
        tensors=json.dumps(sorted(results)),
    )
    write_safetensors(path, tensors, header)


# ----------------------------------------------------------------------------------------------------------
# The ARMOR file: reading
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ArmorLayer:
    """One factorized tensor as stored: ``Ŵ = blockdiag(A) · S · blockdiag(B)``, ``S`` given by values and
    index."""

    name: str
    A: np.ndarray  # (d_out/b, b, b) float32
    B: np.ndarray  # (d_in/b, b, b) float32
    values: np.ndarray  # (d_out, d_in/2)
    index: np.ndarray  # (d_out, d_in/4) uint8

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.index.shape[1] * GROUP

    @property
    def block_size(self) -> int:
        return self.A.shape[1]

    def core(self) -> tuple[np.ndarray, np.ndarray]:
        """The dense 2:4 core ``S`` (d_out, d_in) and its boolean mask."""
        return unpack_2of4(self.values, self.index)

    def core_columns(self) -> np.ndarray:
        """Column of each stored value: ``cols[i, 2q + t] = 4q + p_t`` (d_out, d_in/2)."""
        index = self.index.astype(np.int64)
        positions = np.stack([index & 3, index >> 2], axis=-1)  # (d_out, d_in/4, 2)
        group_start = GROUP * np.arange(index.shape[1])[None, :, None]
        return (group_start + positions).reshape(index.shape[0], -1)

    def sparse_core(self) -> scipy.sparse.csr_matrix:
        """``S`` as a CSR matrix with exactly 2 stored entries per group of 4 (d_in/2 per row)."""
        d_out, d_in = self.shape
        indptr = np.arange(0, d_out * d_in // 2 + 1, d_in // 2)
        data = self.values.astype(np.float64).ravel()
        return scipy.sparse.csr_matrix((data, self.core_columns().ravel(), indptr), shape=(d_out, d_in))

    def reconstruct(self, dtype: type = np.float64) -> np.ndarray:
        """The dense ``Ŵ = blockdiag(A) · S · blockdiag(B)`` (d_out, d_in)."""
        from .factorization import reconstruct

        S, _ = self.core()
        return reconstruct(self.A.astype(np.float64), S.astype(np.float64), self.B.astype(np.float64)).astype(dtype)

    def forward(self, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """``y = A (S (B x)) (+ bias)`` for inputs ``x`` (..., d_in), like ``torch.nn.Linear``; float64.

        Two batched ``b × b`` products around a sparse product with the 2:4 core; ``Ŵ`` is never formed.
        """
        d_out, d_in = self.shape
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != d_in:
            raise ValueError(f"input has {x.shape[-1]} features, layer {self.name!r} expects {d_in}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, d_in)  # (n, d_in)
        n, b = rows.shape[0], self.block_size
        K, R = d_in // b, d_out // b
        z = np.einsum("kij,nkj->nki", self.B.astype(np.float64), rows.reshape(n, K, b)).reshape(n, d_in)  # B x
        u = np.asarray((self.sparse_core() @ z.T).T)  # S (B x)   (n, d_out)
        y = np.einsum("rij,nrj->nri", self.A.astype(np.float64), u.reshape(n, R, b)).reshape(n, d_out)  # A(S(Bx))
        if bias is not None:
            y = y + np.asarray(bias, dtype=np.float64)
        return y.reshape(*lead, d_out)


@dataclass
class ArmorLinear:
    """A NumPy stand-in for a linear layer stored in ARMOR form: ``layer(x) = A (S (B x)) + bias``."""

    layer: ArmorLayer
    bias: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.layer.forward(x, self.bias)


@dataclass
class ArmorFile:
    """A loaded ARMOR file: ``layers`` (factorized tensors by name), ``passthrough`` (everything else),
    ``metadata`` (the header)."""

    path: Path
    metadata: dict[str, str]
    layers: dict[str, ArmorLayer]
    passthrough: dict[str, np.ndarray]

    @property
    def names(self) -> list[str]:
        """Names of the factorized tensors, as in the original model."""
        return sorted(self.layers)

    @property
    def block_size(self) -> int:
        return int(self.metadata["block_size"])

    @property
    def proxy(self) -> str:
        return self.metadata.get("proxy", "")

    def reconstruct(self, name: str, dtype: type = np.float64) -> np.ndarray:
        """The dense ``Ŵ`` of factorized tensor ``name``."""
        return self.layers[name].reconstruct(dtype)

    def linear(self, name: str) -> ArmorLinear:
        """A callable layer for ``name``; its bias is the passthrough tensor ``….bias`` when ``name`` ends in
        ``.weight`` and such a tensor exists."""
        bias = None
        if name.endswith(".weight"):
            bias = self.passthrough.get(name[: -len("weight")] + "bias")
        return ArmorLinear(self.layers[name], bias)


def _bad_armor(path: Path, problem: str) -> InputError:
    return InputError(f"{path}: {problem}", "pass a file written by armor-ref factorize")


def load_armor(path: str | os.PathLike) -> ArmorFile:
    """Read and validate an ARMOR file written by :func:`save_armor`.

    Checks the header (``format=armor``, a block size), that every factorized tensor has all four arrays with
    consistent shapes and dtypes, and that every index code is a valid pair ``p0 < p1``; raises
    :class:`InputError` otherwise.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != ARMOR_FORMAT:
        raise _bad_armor(path, f"not an ARMOR file (header format={metadata.get('format')!r})")
    try:
        b = int(metadata["block_size"])
    except (KeyError, ValueError):
        raise _bad_armor(path, "the header has no valid block_size") from None
    names = {key[: -len(suffix)] for key in tensors for suffix in ARMOR_SUFFIXES if key.endswith(suffix)}
    layers: dict[str, ArmorLayer] = {}
    for name in sorted(names):
        missing = [name + s for s in ARMOR_SUFFIXES if name + s not in tensors]
        if missing:
            raise _bad_armor(path, f"{missing[0]} is missing")
        A, B, values, index = (tensors[name + s] for s in ARMOR_SUFFIXES)
        if A.ndim != 3 or A.shape[1:] != (b, b) or B.ndim != 3 or B.shape[1:] != (b, b):
            raise _bad_armor(path, f"{name}: A {A.shape} and B {B.shape} are not stacks of {b}x{b} blocks")
        d_out, d_in = A.shape[0] * b, B.shape[0] * b
        if values.shape != (d_out, d_in // KEEP) or index.shape != (d_out, d_in // GROUP):
            raise _bad_armor(
                path,
                f"{name}: values {values.shape} / index {index.shape} do not fit a ({d_out}, {d_in}) layer",
            )
        if index.dtype != np.uint8:
            raise _bad_armor(path, f"{name}: index has dtype {index.dtype}, expected uint8")
        layer = ArmorLayer(name, A, B, values, index)
        try:
            _, mask = layer.core()
        except ValueError as err:
            raise _bad_armor(path, f"{name}: {err}") from None
        assert has_two_per_group(mask)
        layers[name] = layer
    passthrough = {key: array for key, array in tensors.items() if not any(key.endswith(s) for s in ARMOR_SUFFIXES)}
    return ArmorFile(path, metadata, layers, passthrough)

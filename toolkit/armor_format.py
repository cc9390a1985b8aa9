"""The exported ARMOR format (spec §6): the one writer and the one reader.

For every factorized tensor ``NAME`` (d_out, d_in) with block size ``b``::

    NAME.armor.A       float32 (d_out/b, b, b)   blocks of the left block-diagonal factor (row scales in)
    NAME.armor.B       float32 (d_in/b, b, b)    blocks of the right block-diagonal factor (column scales in)
    NAME.armor.values  float32 (d_out, d_in/2)   per group of 4 columns, the 2 kept core values, column order
    NAME.armor.index   uint8   (d_out, d_in/4)   per group, p0 | (p1 << 2) with 0 <= p0 < p1 <= 3

    metadata: format=armor, version, block_size, proxy, values_dtype, index_layout, plus whatever the writer adds

so that ``Ŵ = blockdiag(A) · S · blockdiag(B)``. A layer replaced by a low-rank product (``--method svd``,
``svd-llm``, ``aa-svd``; docs/aa-svd-spec.md §5) is stored in the same files, with the same header, as::

    NAME.lowrank.U     float32 (d_out, k)
    NAME.lowrank.V     float32 (k, d_in)         W' = U V,  y = U (V x) + bias

Tensors that were not factorized are stored under their own names.
:func:`armor_tensors` and :func:`armor_metadata` build what every writer stores (``factorize`` writes one file with
:func:`save_armor`; ``compress`` writes one shard per block through the same two functions); :func:`armor_layer`
validates one stored layer, for :func:`load_armor` (a file) and the model loader (a directory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse

from armor_ref.factorization import reconstruct
from armor_ref.masks import GROUP, KEEP, has_two_per_group, pack_2of4, unpack_2of4

from .errors import ArmorError
from .files import read_safetensors, write_safetensors

ARMOR_FORMAT = "armor"
ARMOR_VERSION = "1"
ARMOR_SUFFIXES = (".armor.A", ".armor.B", ".armor.values", ".armor.index")
LOWRANK_SUFFIXES = (".lowrank.U", ".lowrank.V")
INDEX_LAYOUT = "p0 | (p1 << 2), 0 <= p0 < p1 <= 3, per group of 4 columns"
LOWRANK_LAYOUT = "NAME.lowrank.U (d_out, k) and NAME.lowrank.V (k, d_in), float32: W' = U V"


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
class Factorized(Protocol):
    """Anything holding a factorized layer in the layer's own scale: ``Ŵ = blockdiag(A) · S · blockdiag(B)``."""

    A: np.ndarray  # (d_out/b, b, b)
    B: np.ndarray  # (d_in/b, b, b)
    S: np.ndarray  # (d_out, d_in), zero outside M
    M: np.ndarray  # (d_out, d_in) bool, exactly 2 of every 4


def armor_tensors(name: str, result: Factorized) -> dict[str, np.ndarray]:
    """The four exported arrays of one factorized tensor ``name`` (spec §6), C-contiguous."""
    if not has_two_per_group(np.asarray(result.M)):
        raise ValueError(f"{name}: the mask does not keep exactly 2 of every 4 positions")
    values, index = pack_2of4(np.asarray(result.S), np.asarray(result.M))
    return {
        name + ".armor.A": np.ascontiguousarray(result.A, dtype=np.float32),
        name + ".armor.B": np.ascontiguousarray(result.B, dtype=np.float32),
        name + ".armor.values": np.ascontiguousarray(values, dtype=np.float32),
        name + ".armor.index": np.ascontiguousarray(index, dtype=np.uint8),
    }


class LowRankFactors(Protocol):
    """Anything holding a low-rank layer: ``W' = U V``."""

    U: np.ndarray  # (d_out, k)
    V: np.ndarray  # (k, d_in)


def lowrank_tensors(name: str, result: LowRankFactors) -> dict[str, np.ndarray]:
    """The two exported arrays of one low-rank layer ``name``, float32 and C-contiguous."""
    U, V = np.asarray(result.U), np.asarray(result.V)
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
        raise ValueError(f"{name}: factors U {U.shape} and V {V.shape} do not multiply")
    return {
        name + ".lowrank.U": np.ascontiguousarray(U, dtype=np.float32),
        name + ".lowrank.V": np.ascontiguousarray(V, dtype=np.float32),
    }


def armor_metadata(block_size: int, proxy: str, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The header metadata of an ARMOR file: ``extra`` (stringified, JSON for non-strings), then the fixed keys of
    spec §6, which always win: ``format``, ``version``, ``block_size``, ``proxy``, ``values_dtype``,
    ``index_layout``."""
    header = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (extra or {}).items()}
    header.update(
        format=ARMOR_FORMAT,
        version=ARMOR_VERSION,
        block_size=str(block_size),
        proxy=proxy,
        values_dtype="float32",
        index_layout=INDEX_LAYOUT,
    )
    return header


def save_armor(
    path: str | os.PathLike,
    results: Mapping[str, Factorized],
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
    extra = {**(metadata or {}), "tensors": json.dumps(sorted(results))}
    header = armor_metadata(block_sizes.pop() if block_sizes else 0, ",".join(proxies), extra)
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
class LowRankLayer:
    """One low-rank layer as stored: ``W' = U V``."""

    name: str
    U: np.ndarray  # (d_out, k) float32
    V: np.ndarray  # (k, d_in) float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[1]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def reconstruct(self, dtype: type = np.float64) -> np.ndarray:
        """The dense ``W' = U V`` (d_out, d_in), multiplied in float64."""
        return (self.U.astype(np.float64) @ self.V.astype(np.float64)).astype(dtype)


@dataclass
class ArmorLinear:
    """A NumPy stand-in for a linear layer stored in ARMOR form: ``layer(x) = A (S (B x)) + bias``."""

    layer: ArmorLayer
    bias: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.layer.forward(x, self.bias)


@dataclass
class ArmorFile:
    """A loaded ARMOR file: ``layers`` (ARMOR-factorized tensors by name), ``lowrank`` (low-rank layers by name),
    ``passthrough`` (everything else), ``metadata`` (the header)."""

    path: Path
    metadata: dict[str, str]
    layers: dict[str, ArmorLayer]
    passthrough: dict[str, np.ndarray]
    lowrank: dict[str, LowRankLayer] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Names of the ARMOR-factorized tensors, as in the original model."""
        return sorted(self.layers)

    @property
    def block_size(self) -> int:
        return int(self.metadata["block_size"])

    @property
    def proxy(self) -> str:
        return self.metadata.get("proxy", "")

    def reconstruct(self, name: str, dtype: type = np.float64) -> np.ndarray:
        """The dense ``Ŵ`` of factorized tensor ``name`` (ARMOR or low-rank)."""
        return (self.layers.get(name) or self.lowrank[name]).reconstruct(dtype)

    def linear(self, name: str) -> ArmorLinear:
        """A callable layer for ``name``; its bias is the passthrough tensor ``….bias`` when ``name`` ends in
        ``.weight`` and such a tensor exists."""
        bias = None
        if name.endswith(".weight"):
            bias = self.passthrough.get(name[: -len("weight")] + "bias")
        return ArmorLinear(self.layers[name], bias)


def _bad_armor(source: object, problem: str) -> ArmorError:
    return ArmorError(f"{source}: {problem}", "write it again with armor-ref (factorize or compress)")


def dense_tensor_name(stem: str, metadata: Mapping[str, str] | None = None) -> str:
    """The dense tensor a stored layer ``stem`` stands for. ``factorize`` stores *tensors* under their own names (its
    header lists them in ``tensors``); ``compress`` stores *modules*: ``NAME.armor.*`` for the linear ``NAME``, whose
    dense tensor is ``NAME.weight``."""
    return stem if metadata and "tensors" in metadata else f"{stem}.weight"


def armor_stems(names: object) -> list[str]:
    """The factorized tensors' names (``NAME`` of ``NAME.armor.*``) among tensor ``names``, sorted."""
    return sorted({key[: -len(s)] for key in names for s in ARMOR_SUFFIXES if key.endswith(s)})  # type: ignore[union-attr]


def lowrank_stems(names: object) -> list[str]:
    """The low-rank layers' names (``NAME`` of ``NAME.lowrank.*``) among tensor ``names``, sorted."""
    return sorted({key[: -len(s)] for key in names for s in LOWRANK_SUFFIXES if key.endswith(s)})  # type: ignore[union-attr]


def is_factor_tensor(name: str) -> bool:
    """Whether tensor ``name`` is one of a stored layer's factors (``NAME.armor.*`` or ``NAME.lowrank.*``)."""
    return name.endswith(ARMOR_SUFFIXES + LOWRANK_SUFFIXES)


def lowrank_layer(name: str, arrays: Mapping[str, np.ndarray], source: object) -> LowRankLayer:
    """Validate and return the low-rank layer ``name`` from ``arrays`` (holding ``name.lowrank.U/V``): both present,
    2-D, floating, ``U`` (d_out, k) and ``V`` (k, d_in) with ``k ≥ 1``, finite. :class:`ArmorError` naming
    ``source`` otherwise."""
    missing = [name + s for s in LOWRANK_SUFFIXES if name + s not in arrays]
    if missing:
        raise _bad_armor(source, f"{missing[0]} is missing")
    U, V = (np.asarray(arrays[name + s]) for s in LOWRANK_SUFFIXES)
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0] or U.shape[1] < 1:
        raise _bad_armor(source, f"{name}: factors U {U.shape} and V {V.shape} are not (d_out, k) and (k, d_in)")
    for part, array in (("U", U), ("V", V)):
        if array.dtype.kind != "f":
            raise _bad_armor(source, f"{name}.lowrank.{part} has dtype {array.dtype}, expected float32")
        if not np.all(np.isfinite(array)):
            raise _bad_armor(source, f"{name}.lowrank.{part} holds NaN or Inf values")
    return LowRankLayer(name, U, V)


def armor_layer(name: str, arrays: Mapping[str, np.ndarray], block_size: int, source: object) -> ArmorLayer:
    """Validate and return the stored layer ``name`` from ``arrays`` (holding ``name.armor.A/B/values/index``):
    all four present, ``A``/``B`` stacks of ``block_size``² blocks, values/index shapes that fit, a uint8 index whose
    every code is a valid pair ``p0 < p1``, finite factors. :class:`ArmorError` naming ``source`` otherwise."""
    missing = [name + s for s in ARMOR_SUFFIXES if name + s not in arrays]
    if missing:
        raise _bad_armor(source, f"{missing[0]} is missing")
    A, B, values, index = (np.asarray(arrays[name + s]) for s in ARMOR_SUFFIXES)
    b = block_size
    if A.ndim != 3 or A.shape[1:] != (b, b) or B.ndim != 3 or B.shape[1:] != (b, b):
        raise _bad_armor(source, f"{name}: A {A.shape} and B {B.shape} are not stacks of {b}x{b} blocks")
    d_out, d_in = A.shape[0] * b, B.shape[0] * b
    if values.shape != (d_out, d_in // KEEP) or index.shape != (d_out, d_in // GROUP):
        raise _bad_armor(
            source, f"{name}: values {values.shape} / index {index.shape} do not fit a ({d_out}, {d_in}) layer"
        )
    if index.dtype != np.uint8:
        raise _bad_armor(source, f"{name}: index has dtype {index.dtype}, expected uint8")
    for part, array in (("A", A), ("B", B), ("values", values)):
        if not np.all(np.isfinite(array)):
            raise _bad_armor(source, f"{name}.armor.{part} holds NaN or Inf values")
    layer = ArmorLayer(name, A, B, values, index)
    try:
        _, mask = layer.core()
    except ValueError as err:
        raise _bad_armor(source, f"{name}: {err}") from None
    assert has_two_per_group(mask)
    return layer


def block_size_of(metadata: Mapping[str, str], source: object) -> int:
    """The ``block_size`` of an ARMOR header; :class:`ArmorError` unless it is ``format=armor`` with a valid one."""
    if metadata.get("format") != ARMOR_FORMAT:
        raise _bad_armor(source, f"not an ARMOR file (header format={metadata.get('format')!r})")
    try:
        b = int(metadata["block_size"])
    except (KeyError, ValueError):
        raise _bad_armor(source, "the header has no valid block_size") from None
    if b <= 0 or b % GROUP:
        raise _bad_armor(source, f"the header's block_size {b} is not a positive multiple of {GROUP}")
    return b


def load_armor(path: str | os.PathLike, block_size: int | None = None) -> ArmorFile:
    """Read and validate an ARMOR file written by :func:`save_armor` or ``compress`` (see :func:`armor_layer` and
    :func:`lowrank_layer`); raises :class:`ArmorError` on any problem. ``block_size``: for a shard of a compressed
    directory, whose header need not be ARMOR's (a compressed model's ``save_pretrained`` writes transformers' own)
    because the block size is in the directory's ``config.json``."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    b = block_size_of(metadata, path) if block_size is None else block_size
    layers = {name: armor_layer(name, tensors, b, path) for name in armor_stems(tensors)}
    lowrank = {name: lowrank_layer(name, tensors, path) for name in lowrank_stems(tensors)}
    passthrough = {key: array for key, array in tensors.items() if not is_factor_tensor(key)}
    return ArmorFile(path, metadata, layers, passthrough, lowrank)

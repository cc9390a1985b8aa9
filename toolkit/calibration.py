"""Calibration data for the layer-level commands (``factorize``, ``prune``, ``demo``), always reduced to a Gram
matrix ``H = Xᵀ X`` in float64:

* ``.npy``: activations ``X`` (N, d_in); used for every 2-D weight whose input dimension ``shape[1]`` is d_in.
* ``.npz`` / ``.safetensors`` keyed by tensor name: ``NAME`` holds activations (N, d_in) for tensor ``NAME``;
  ``NAME.gram`` holds a precomputed Gram matrix ``XᵀX`` (d_in, d_in).

Several files (a repeated ``--calib``) are merged by :func:`load_calibrations`, each tensor taking its calibration
from exactly one of them (e.g. one ``.npy`` per input width).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import ArmorError
from .files import read_safetensors

GRAM_SUFFIX = ".gram"
GRAM_CHUNK_ROWS = 4096  # activations are turned into float64 this many rows at a time


# ----------------------------------------------------------------------------------------------------------
def gram_from_activations(X: np.ndarray, source: str) -> np.ndarray:
    """``H = Xᵀ X`` in float64 for activations ``X`` (N, d_in), accumulated over chunks of rows so that no
    float64 copy of the whole of ``X`` is made (``X`` may be a memory map). Rejects NaN/Inf."""
    d_in = X.shape[1]
    H = np.zeros((d_in, d_in))
    for start in range(0, X.shape[0], GRAM_CHUNK_ROWS):
        chunk = np.asarray(X[start : start + GRAM_CHUNK_ROWS], dtype=np.float64)
        if not np.all(np.isfinite(chunk)):
            raise ArmorError(f"calibration {source} contains NaN or Inf values", "drop or fix those rows")
        H += chunk.T @ chunk
    return check_gram(H, source)


def check_gram(H: np.ndarray, source: str, psd: bool = False) -> np.ndarray:
    """``H`` if it is a usable Gram matrix ``XᵀX``: finite (no overflow), not all zero (the relative output error
    and the damped Hessian need ``tr H > 0``), and with ``psd`` positive semi-definite up to rounding (a Cholesky
    factorisation of ``H + 1e-9 · max(diag H) · I`` exists: a negated or indefinite matrix is no Gram matrix).
    :class:`ArmorError` naming ``source`` otherwise."""
    if not np.all(np.isfinite(H)):
        raise ArmorError(f"calibration {source}: XᵀX overflows to Inf or NaN", "scale the calibration data down")
    top = float(np.max(np.diag(H), initial=0.0))
    if top <= 0 and psd and np.any(H):
        raise ArmorError(f"calibration {source} is not positive semi-definite", "store XᵀX of shape (d_in, d_in)")
    if top <= 0:
        raise ArmorError(f"calibration {source} is all zero (XᵀX = 0)", "give activations that are not all zero")
    if psd:
        try:
            np.linalg.cholesky(H + 1e-9 * top * np.eye(len(H)))
        except np.linalg.LinAlgError:
            raise ArmorError(
                f"calibration {source} is not positive semi-definite, so it is not a Gram matrix XᵀX",
                "store XᵀX of shape (d_in, d_in), or give the activations X instead",
            ) from None
    return H


def _check_numeric(array: np.ndarray, source: str) -> None:
    if array.dtype.kind not in "fiu":
        raise ArmorError(
            f"calibration {source} has dtype {array.dtype}, not a number type",
            "store activations as a float array",
        )


def _check_input_dim(name: str, weight: np.ndarray, d_in: int, source: str) -> None:
    if weight.ndim != 2 or weight.shape[1] != d_in:
        raise ArmorError(
            f"calibration {source} has dimension {d_in} but tensor {name!r} has shape {weight.shape}",
            "give activations whose width is the tensor's input dimension (shape[1])",
        )


def _read_npy(path: Path) -> np.ndarray:
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ArmorError(
            f"cannot read calibration file {path} ({err})",
            "save activations with numpy.save as a 2-D float array (N, d_in)",
        ) from None
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        shape = getattr(X, "shape", "?")
        raise ArmorError(
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
        raise ArmorError(
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
    of ``weights`` are ignored. Raises :class:`ArmorError` on unreadable files, NaN/Inf, mismatched
    dimensions, or when no tensor of ``weights`` gets calibration.
    """
    path = Path(path)
    if not path.is_file():
        raise ArmorError(f"calibration file not found: {path}", "check the --calib path")
    result: dict[str, tuple[np.ndarray, int | None]] = {}
    if path.suffix == ".npy":
        X = _read_npy(path)
        d_in = X.shape[1]
        matching = [name for name, w in weights.items() if w.ndim == 2 and w.shape[1] == d_in]
        if not matching:
            widths = sorted({int(w.shape[1]) for w in weights.values() if w.ndim == 2})
            raise ArmorError(
                f"calibration {path} has dimension {d_in} but no 2-D tensor has that input dimension (found {widths})",
                "give activations of the layer's input, shape (N, d_in)",
            )
        H = gram_from_activations(X, str(path))
        return {name: (H, int(X.shape[0])) for name in matching}
    if path.suffix not in (".npz", ".safetensors"):
        raise ArmorError(
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
            raise ArmorError(f"calibration {path} has both {name!r} and {name + GRAM_SUFFIX!r}", "keep only one")
        _check_numeric(array, source)
        if key.endswith(GRAM_SUFFIX):
            if array.ndim != 2 or array.shape[0] != array.shape[1]:
                raise ArmorError(
                    f"calibration {source} has shape {array.shape}, not a square Gram matrix",
                    "store XᵀX of shape (d_in, d_in)",
                )
            _check_input_dim(name, weights[name], array.shape[0], source)
            H = np.asarray(array, dtype=np.float64)
            if not np.all(np.isfinite(H)):
                raise ArmorError(f"calibration {source} contains NaN or Inf values", "recompute the Gram matrix")
            if not np.allclose(H, H.T, rtol=1e-5, atol=1e-8 * float(np.max(np.abs(H), initial=0.0))):
                raise ArmorError(f"calibration {source} is not symmetric", "store XᵀX of shape (d_in, d_in)")
            result[name] = (check_gram((H + H.T) / 2, source, psd=True), None)
        else:
            if array.ndim != 2:
                raise ArmorError(
                    f"calibration {source} has shape {array.shape}, not (N, d_in)",
                    "store activations as a 2-D array, one row per token",
                )
            _check_input_dim(name, weights[name], array.shape[1], source)
            result[name] = (gram_from_activations(array, source), int(array.shape[0]))
    if not result:
        raise ArmorError(
            f"calibration {path} has no key naming any of the tensors {_short_list(weights)}",
            "key activations by tensor name (NAME or NAME.gram)",
        )
    return result


def load_calibrations(
    paths: list[str | os.PathLike] | tuple[str | os.PathLike, ...], weights: Mapping[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, int | None]]:
    """:func:`load_calibration` of each file, merged. A tensor that gets calibration from two files is an
    :class:`ArmorError` (which one was meant is not ours to guess), as is a file that calibrates nothing."""
    merged: dict[str, tuple[np.ndarray, int | None]] = {}
    source: dict[str, str] = {}
    for path in paths:
        for name, entry in load_calibration(path, weights).items():
            if name in merged:
                raise ArmorError(
                    f"tensor {name!r} gets calibration from both {source[name]} and {path}",
                    "give each tensor's calibration in one --calib file",
                )
            merged[name], source[name] = entry, str(path)
    return merged

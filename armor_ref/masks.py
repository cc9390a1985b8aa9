"""2:4 semi-structured sparsity: selecting, checking and packing masks.

A matrix is 2:4 sparse when, along each row, every aligned group of 4 columns holds at most 2 non-zeros.
We always keep exactly two *positions* per group (a kept value may be 0), which is what the exported
format of spec §6 stores:

    values[i, 2q + t] = S[i, 4q + p_t]          t = 0, 1 with p_0 < p_1
    index[i, q]       = p_0 | (p_1 << 2)        uint8
"""

from __future__ import annotations

import itertools

import numpy as np

GROUP = 4
KEEP = 2

#: The 6 ways of keeping 2 of 4 positions, as (p0, p1) with p0 < p1, in a fixed order.
SUPPORTS: np.ndarray = np.array(list(itertools.combinations(range(GROUP), KEEP)), dtype=np.int64)  # (6, 2)


def check_groupable(d_in: int) -> None:
    """Raise ValueError unless ``d_in`` splits into aligned groups of 4."""
    if d_in % GROUP != 0:
        raise ValueError(f"input dimension {d_in} is not divisible by {GROUP}; 2:4 sparsity needs groups of 4")


def group_columns(q: int) -> slice:
    """The columns ``4q … 4q+3`` of group ``q``."""
    return slice(q * GROUP, (q + 1) * GROUP)


def select_2of4(scores: np.ndarray) -> np.ndarray:
    """Keep, in every aligned group of 4 columns of every row, the 2 entries with the largest score (spec §3.1).

    Ties go to the lower column (a stable sort), so the result is deterministic.
    Returns a boolean mask of the same shape, exactly 2 True per group.
    """
    d_out, d_in = scores.shape
    check_groupable(d_in)
    rows = np.arange(d_out)
    mask = np.zeros((d_out, d_in), dtype=bool)
    for q in range(d_in // GROUP):
        cols = group_columns(q)
        best = np.argsort(-scores[:, cols], axis=1, kind="stable")[:, :KEEP]  # (d_out, 2): the two best positions
        for t in range(KEEP):
            mask[rows, q * GROUP + best[:, t]] = True
    return mask


def is_2of4(matrix_or_mask: np.ndarray) -> bool:
    """True when every aligned group of 4 columns has at most 2 non-zero (or True) entries."""
    d_out, d_in = matrix_or_mask.shape
    if d_in % GROUP != 0:
        return False
    nonzero = (matrix_or_mask != 0).reshape(d_out, d_in // GROUP, GROUP).sum(axis=-1)
    return bool(np.all(nonzero <= KEEP))


def has_two_per_group(mask: np.ndarray) -> bool:
    """True when the boolean ``mask`` keeps exactly 2 positions in every group (the exported layout)."""
    d_out, d_in = mask.shape
    return d_in % GROUP == 0 and bool(np.all(mask.reshape(d_out, -1, GROUP).sum(axis=-1) == KEEP))


def pack_2of4(core: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack a 2:4 core into ``values`` (d_out, d_in/2) and ``index`` uint8 (d_out, d_in/4) (spec §6.2).

    ``mask`` must keep exactly 2 positions per group; entries of ``core`` outside the mask are dropped.
    """
    if not has_two_per_group(mask):
        raise ValueError("mask must keep exactly 2 of every 4 positions")
    d_out, d_in = core.shape
    rows = np.arange(d_out)
    values = np.empty((d_out, d_in // GROUP * KEEP), dtype=core.dtype)
    index = np.empty((d_out, d_in // GROUP), dtype=np.uint8)
    for q in range(d_in // GROUP):
        kept = mask[:, group_columns(q)]  # (d_out, 4), two True per row
        p0 = np.argmax(kept, axis=1)  # the first kept position
        p1 = GROUP - 1 - np.argmax(kept[:, ::-1], axis=1)  # the last kept position
        values[:, KEEP * q] = core[rows, q * GROUP + p0]
        values[:, KEEP * q + 1] = core[rows, q * GROUP + p1]
        index[:, q] = p0 | (p1 << 2)
    return values, index


def unpack_2of4(values: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_2of4`: the dense core (d_out, d_in) and its boolean mask.

    Raises ValueError on a malformed index (positions not ``0 <= p0 < p1 <= 3``) or mismatched shapes.
    """
    d_out, groups = index.shape
    if values.shape != (d_out, groups * KEEP):
        raise ValueError(f"values shape {values.shape} does not match index shape {index.shape}")
    index = index.astype(np.int64)
    p0, p1 = index & 3, index >> 2  # (d_out, groups)
    if np.any(p1 > 3) or np.any(p0 >= p1):
        raise ValueError("index holds positions outside 0 <= p0 < p1 <= 3")
    rows = np.arange(d_out)
    core = np.zeros((d_out, groups * GROUP), dtype=values.dtype)
    mask = np.zeros((d_out, groups * GROUP), dtype=bool)
    for q in range(groups):
        for t, p in enumerate((p0[:, q], p1[:, q])):
            core[rows, q * GROUP + p] = values[:, KEEP * q + t]
            mask[rows, q * GROUP + p] = True
    return core, mask

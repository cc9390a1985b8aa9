"""2:4 masks in torch — mirrors :mod:`armor_ref.masks` (same names, same rules).

values[i, 2q + t] = S[i, 4q + p_t]          t = 0, 1 with p_0 < p_1
index[i, q]       = p_0 | (p_1 << 2)        uint8
"""

from __future__ import annotations

import torch

from armor_ref.masks import GROUP, KEEP
from armor_ref.masks import SUPPORTS as _SUPPORTS_NP

#: The 6 ways of keeping 2 of 4 positions, (p0, p1) with p0 < p1, in the reference's order (CPU tensor).
SUPPORTS: torch.Tensor = torch.from_numpy(_SUPPORTS_NP.copy())  # (6, 2) int64


def check_groupable(d_in: int) -> None:
    """Raise ValueError unless ``d_in`` splits into aligned groups of 4."""
    if d_in % GROUP != 0:
        raise ValueError(f"input dimension {d_in} is not divisible by {GROUP}; 2:4 sparsity needs groups of 4")


def select_2of4(scores: torch.Tensor) -> torch.Tensor:
    """Keep, in every aligned group of 4 columns, the 2 entries with the largest score; ties go to the lower
    column (stable sort), exactly as the reference. Returns a bool mask of the same shape."""
    d_out, d_in = scores.shape
    check_groupable(d_in)
    groups = scores.reshape(d_out, d_in // GROUP, GROUP)
    order = torch.argsort(-groups, dim=-1, stable=True)[..., :KEEP]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(d_out, d_in)


def is_2of4(matrix_or_mask: torch.Tensor) -> bool:
    """True when every aligned group of 4 columns has at most 2 non-zero (or True) entries."""
    d_out, d_in = matrix_or_mask.shape
    if d_in % GROUP != 0:
        return False
    nonzero = (matrix_or_mask != 0).reshape(d_out, d_in // GROUP, GROUP).sum(dim=-1)
    return bool(torch.all(nonzero <= KEEP))


def has_two_per_group(mask: torch.Tensor) -> bool:
    """True when ``mask`` keeps exactly 2 positions in every group (the exported layout)."""
    d_out, d_in = mask.shape
    return d_in % GROUP == 0 and bool(torch.all(mask.reshape(d_out, -1, GROUP).sum(dim=-1) == KEEP))


def pack_2of4(core: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (d_out, d_in/2) and ``index`` uint8 (d_out, d_in/4) of a 2:4 core (spec §6)."""
    if not has_two_per_group(mask):
        raise ValueError("mask must keep exactly 2 of every 4 positions")
    d_out, d_in = core.shape
    groups = d_in // GROUP
    # positions of the kept entries, increasing: sort (not kept, position) and take the first two
    m = mask.reshape(d_out, groups, GROUP)
    positions = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)[..., :KEEP]  # p0 < p1
    values = torch.gather(core.reshape(d_out, groups, GROUP), -1, positions)
    index = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    return values.reshape(d_out, groups * KEEP).contiguous(), index.contiguous()


def unpack_2of4(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_2of4`: the dense core (d_out, d_in) and its bool mask; ValueError when malformed."""
    d_out, groups = index.shape
    if tuple(values.shape) != (d_out, groups * KEEP):
        raise ValueError(f"values shape {tuple(values.shape)} does not match index shape {tuple(index.shape)}")
    index = index.to(torch.int64)
    p0, p1 = index & 3, index >> 2
    if bool(torch.any(p1 > 3)) or bool(torch.any(p0 >= p1)):
        raise ValueError("index holds positions outside 0 <= p0 < p1 <= 3")
    positions = torch.stack([p0, p1], dim=-1)  # (d_out, groups, 2)
    core = torch.zeros((d_out, groups, GROUP), dtype=values.dtype, device=values.device)
    core.scatter_(-1, positions, values.reshape(d_out, groups, KEEP))
    mask = torch.zeros((d_out, groups, GROUP), dtype=torch.bool, device=values.device)
    mask.scatter_(-1, positions, True)
    return core.reshape(d_out, groups * GROUP), mask.reshape(d_out, groups * GROUP)

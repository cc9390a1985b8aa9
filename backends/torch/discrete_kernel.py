"""The discrete step's column-block walk as ONE fused Triton kernel launch (issue 10, item 1).

:func:`walk_column_block_fused` has the signature and the answers of :func:`backends.factorization.walk_column_block`
(the plain loop over the positions, vectorised over the tiles): for a batch of ``nk`` column blocks that do not
interact (hessian: one column block; nowag: all of them), every tile ``(r, k)`` (row block ``r``, column block ``k``)
visits the positions ``(p, g) = divmod(flat, b/4)`` in the given order and re-chooses its group there — row ``p`` of
the row block, columns ``4g … 4g+3`` of the column block — exactly as the loop does::

    s = S[r, p, k, g]   a2 = a_norm2[r, p]   a2' = a2 if a2 > 0 else 1   first = L[r, p, k, g]
    ℓ = first + a2 · Q[k, g] s                         cost_now = −sᵀ(ℓ + first)      (= a2 sᵀQs − 2 sᵀℓ)
    cost_s = ℓ_sᵀ Z_s ℓ_s / a2'   u_s = P_s ℓ_s / a2'   (the 6 supports s; Z_s, P_s read from the table T[k, g])
    margin = tie · (|cost[current]| + |cost_now|) + TINY
    best = first argmin of cost;  switch = cost[best] < cost[current] − margin
    chosen = best if switch else current;  accept = a2 > 0 and cost[chosen] < cost_now − margin
    if accept: S[r, p, k, g] ← u_chosen, M[r, p, k, g] ← the chosen support; δ = new s − old s
               L[r, :, k] −= AtA[r][:, p] ⊗ (δᵀ BHBt[k][4g:4g+4, :])

The tables are :func:`backends.factorization.group_tables`' own, the one source for both paths: ``Q`` (nk, b/4, 4, 4),
``T`` (nk, b/4, 30, 20) and ``BHBt`` (nk, b, b). The kernel reads the 2×2 blocks ``Z_s`` and ``P_s = Q_ss⁺`` (the
pseudo-inverses with group_tables' scale-relative cut-off) where ``T`` keeps them — ``Z_s[i, j]`` at
``T[s, 4·sᵢ + sⱼ]``, ``P_s[i, j]`` at ``T[6 + 4s + sᵢ, 16 + sⱼ]`` — 8 numbers per support instead of the loop's
30×20 product, with the same terms in the same order.

Design. Grid ``(R, nk)``: program ``(r, k)`` owns tile ``(r, k)`` and walks every position in order (the tiles
never interact; the positions of one tile are sequential). In registers for the whole walk: the tile's ``L`` as a
``(b, b/4, 4)`` block (row, group, column in group), loaded once and stored once at the end. Per position, from
memory: the position, the group's 4 values of ``S`` and ``M`` (the bool mask viewed as uint8), ``a2``, ``Q[k, g]``
(16 numbers) and the 6 supports' 8 table entries (read-only, shared by the programs of a column block: cache hits).
Only when a group is accepted: the 4 rows of ``BHBt[k]`` and the column ``AtA[r][:, p]`` for the rank-1 update of
the tile, and the stores of the group's values and mask (then a barrier, so that a revisited position reads them
back). ``first`` is taken out of the tile by a masked sum (exact: the other terms are zeros); the 6 supports are the
lanes of an 8-wide vector (2 padding lanes cost +inf); argmin is "smallest cost, then smallest lane", the first-index
rule. The launch turns FP contraction off (no FMA): float64 results agree with the loop's to round-off. dtype:
whatever float the tensors share (float64 or float32), arithmetic in it; ``tie`` and ``TINY`` come in as a
2-element tensor of that dtype (Triton would type Python floats as float32, and 1e-300 is 0 in float32, as it is for
the loop's float32 arithmetic). Program offsets are int64. ``num_warps``: :func:`default_num_warps`.

Where it runs. On CUDA tensors the kernel is compiled; on CPU tensors it runs under Triton's interpreter, which is how
the tests check it without a GPU (``TRITON_INTERPRET=1`` must be set before triton is imported, so the tests run it
in a subprocess). :func:`backends.factorization.discrete_step` takes it for torch on CUDA when triton is importable
(see :func:`backends.factorization.column_block_walk` and ``ARMOR_FUSED_WALK``). :data:`LAUNCHES` counts launches:
one per call, so a hessian discrete step launches at most ``d_in / b`` kernels (one per column block with a position
worth visiting) and a nowag step one, against ``(d_in/b) · b²/4`` sequential positions of a few dozen small torch
operations each in the loop (benchmarks/discrete_step_counts.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the fused walk needs triton (the "gpu" extra); the loop does not
    triton = None

from armor_ref.factorization import TINY

GROUP = 4
#: Launches of the fused kernel since import (one per call of :func:`walk_column_block_fused`).
LAUNCHES = {"walk_column_block": 0}


if triton is not None:

    @triton.jit
    def _walk_kernel(
        L_ptr, S_ptr, M_ptr, AtA_ptr, a2_ptr,  # strided views, strides below
        Q_ptr, T_ptr, BHBt_ptr, sup_ptr,  # contiguous (nk, b/4, 4, 4), (nk, b/4, 30, 20), (nk, b, b), (12,)
        pos_ptr, n_positions, consts_ptr, changed_ptr,  # positions (n,), [tie, TINY], int32 counter
        sL0, sL1, sL2, sL3,  # L (R, b, nk, b)
        sS0, sS1, sS2, sS3, sS4,  # S (R, b, nk, b/4, 4)
        sM0, sM1, sM2, sM3, sM4,  # M (R, b, nk, b/4, 4), uint8
        sA0, sA1, sA2,  # AtA (R, b, b)
        sa0, sa1,  # a_norm2 (R, b)
        B: tl.constexpr, NB: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1).to(tl.int64)
        i_b = tl.arange(0, B)  # row of the tile
        i_g = tl.arange(0, NB)  # group of the column block
        i_4 = tl.arange(0, 4)  # column inside a group
        i_8 = tl.arange(0, 8)  # support lane (6 real)
        row3 = i_b[:, None, None]
        grp3 = i_g[None, :, None]
        col3 = grp3 * 4 + i_4[None, None, :]  # (1, NB, 4): column of the tile
        # the 6 supports (p0 < p1), in the support tables' order, as lanes 0..5
        real = i_8 < 6
        p0 = tl.load(sup_ptr + 2 * i_8, mask=real, other=0)
        p1 = tl.load(sup_ptr + 2 * i_8 + 1, mask=real, other=0)
        on_p0 = p0[:, None] == i_4[None, :]  # (8, 4)
        on_p1 = p1[:, None] == i_4[None, :]

        L_tile = L_ptr + r * sL0 + k * sL2 + row3 * sL1 + col3 * sL3
        Lt = tl.load(L_tile)  # (B, NB, 4): the tile's L, in registers throughout
        S_row = S_ptr + r * sS0 + k * sS2
        M_row = M_ptr + r * sM0 + k * sM2
        Q_k = Q_ptr + k * (NB * 16)
        T_k = T_ptr + k * (NB * 600)
        tie = tl.load(consts_ptr)
        tiny = tl.load(consts_ptr + 1)
        zero = tie * 0
        changed = 0
        for i in range(n_positions):
            flat = tl.load(pos_ptr + i)
            p = flat // NB
            g = flat % NB
            s_at = S_row + p * sS1 + g * sS3 + i_4 * sS4  # (4,)
            m_at = M_row + p * sM1 + g * sM3 + i_4 * sM4
            s = tl.load(s_at)
            m = tl.load(m_at) != 0
            a2 = tl.load(a2_ptr + r * sa0 + p * sa1)
            scale = tl.where(a2 > 0, a2, zero + 1)
            # ℓ = first + a2 · Q s   (first taken out of the tile by a masked sum of exact zeros)
            here = (row3 == p) & (grp3 == g)
            first = tl.sum(tl.sum(tl.where(here, Lt, zero), axis=0), axis=0)  # (4,)
            Qg = tl.load(Q_k + g * 16 + i_4[:, None] * 4 + i_4[None, :])  # (4, 4)
            ell = first + a2 * tl.sum(Qg * s[None, :], axis=1)
            cost_now = -tl.sum(s * (ell + first), axis=0)
            # the 6 supports: ‖a‖² cost = ℓ_sᵀ Z_s ℓ_s, ‖a‖² u = P_s ℓ_s, Z_s and P_s where T keeps them
            l0 = tl.sum(tl.where(on_p0, ell[None, :], zero), axis=1)  # (8,) ℓ[p0]
            l1 = tl.sum(tl.where(on_p1, ell[None, :], zero), axis=1)
            Tz = T_k + g * 600 + i_8 * 20  # row s of T: Z_s spread over the 16 products ℓ_i ℓ_j
            Tp0 = T_k + g * 600 + (6 + 4 * i_8 + p0) * 20 + 16  # row 6 + 4s + p0: P_s's first row
            Tp1 = T_k + g * 600 + (6 + 4 * i_8 + p1) * 20 + 16
            z00 = tl.load(Tz + 4 * p0 + p0, mask=real, other=0)
            z01 = tl.load(Tz + 4 * p0 + p1, mask=real, other=0)
            z10 = tl.load(Tz + 4 * p1 + p0, mask=real, other=0)
            z11 = tl.load(Tz + 4 * p1 + p1, mask=real, other=0)
            P00 = tl.load(Tp0 + p0, mask=real, other=0)
            P01 = tl.load(Tp0 + p1, mask=real, other=0)
            P10 = tl.load(Tp1 + p0, mask=real, other=0)
            P11 = tl.load(Tp1 + p1, mask=real, other=0)
            cost = (z00 * (l0 * l0) + z01 * (l0 * l1) + z10 * (l1 * l0) + z11 * (l1 * l1)) / scale
            cost = tl.where(real, cost, float("inf"))
            # current support: the lane whose two positions are kept in m; best: the first argmin
            m0 = tl.sum(tl.where(on_p0, m[None, :], False).to(tl.int32), axis=1) > 0
            m1 = tl.sum(tl.where(on_p1, m[None, :], False).to(tl.int32), axis=1) > 0
            current = tl.min(tl.where(m0 & m1 & real, i_8, 8), axis=0)
            cost_current = tl.sum(tl.where(i_8 == current, cost, zero), axis=0)
            cost_best = tl.min(cost, axis=0)
            best = tl.min(tl.where(cost == cost_best, i_8, 8), axis=0)
            margin = tie * (tl.abs(cost_current) + tl.abs(cost_now)) + tiny
            switch = cost_best < cost_current - margin
            chosen = tl.where(switch, best, current)
            accept = (a2 > 0) & (tl.where(switch, cost_best, cost_current) < cost_now - margin)
            if accept:
                pick = i_8 == chosen
                c0 = tl.sum(tl.where(pick, p0, 0), axis=0)
                c1 = tl.sum(tl.where(pick, p1, 0), axis=0)
                v0 = tl.sum(tl.where(pick, P00 * l0 + P01 * l1, zero), axis=0) / scale
                v1 = tl.sum(tl.where(pick, P10 * l0 + P11 * l1, zero), axis=0) / scale
                new_s = tl.where(i_4 == c0, v0, tl.where(i_4 == c1, v1, zero))
                tl.store(s_at, new_s)
                tl.store(m_at, ((i_4 == c0) | (i_4 == c1)).to(tl.uint8))
                # L[r, :, k] −= AtA[r][:, p] ⊗ (δᵀ BHBt[k][4g:4g+4, :])
                delta = new_s - s
                rows4 = tl.load(BHBt_ptr + k * (B * B) + (g * 4 + i_4)[:, None, None] * B + col3)  # (4, NB, 4)
                v = tl.sum(delta[:, None, None] * rows4, axis=0)  # (NB, 4)
                a_col = tl.load(AtA_ptr + r * sA0 + i_b * sA1 + p * sA2)  # (B,)
                Lt = Lt - a_col[:, None, None] * v[None, :, :]
                changed += switch.to(tl.int32)
                tl.debug_barrier()  # a later position's loads of S and M see these stores
        tl.store(L_tile, Lt)
        tl.atomic_add(changed_ptr, changed)


def available() -> bool:
    """Whether the fused walk can run here: triton importable."""
    return triton is not None


def interpreting() -> bool:
    """Whether triton was imported under its CPU interpreter (``TRITON_INTERPRET=1`` set before the import)."""
    return triton is not None and type(_walk_kernel).__name__ == "InterpretedFunction"


def default_num_warps(b: int) -> int:
    """Warps per program: the fewest with which ptxas keeps the ``b×b`` tile in registers without spilling on sm_90
    (checked by compiling for H100 without a GPU, tests/test_discrete_kernel.py): 4, and 8 from ``b = 64``."""
    return 8 if b >= 64 else 4


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device`` without stopping the host: through pinned memory, asynchronously, on
    CUDA (a copy from pageable memory would wait for the GPU to finish everything queued before it, once per column
    block); the pinned buffer is kept by torch's host allocator until the copy is done."""
    host = torch.tensor(values, dtype=dtype)
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


def walk_column_block_fused(
    xp: Any,
    S_k: torch.Tensor,
    M_k: torch.Tensor,
    L_k: torch.Tensor,
    AtA: torch.Tensor,
    a_norm2: torch.Tensor,
    tables: Any,
    tie: float,
    positions: Sequence[int],
) -> torch.Tensor:
    """:func:`backends.factorization.walk_column_block` as ONE Triton launch, grid ``(R, nk)`` (module docstring):
    same arguments (torch tensors; ``S_k``, ``M_k`` (R, b, nk, b/4, 4) and ``L_k`` (R, b, nk·b) updated in place,
    strided views welcome), same result, the number of support changes as a 0-d int64 tensor on the device (no
    host synchronisation). Compiled on CUDA tensors, interpreted on CPU tensors under ``TRITON_INTERPRET=1``."""
    del xp  # the kernel is torch's; the argument keeps walk_column_block's signature
    if triton is None:
        raise RuntimeError("the fused walk needs triton: pip install 'armor-ref[gpu]'")
    R, b, nk, nb, _ = S_k.shape
    device, dtype = S_k.device, S_k.dtype
    if (device.type == "cpu") != interpreting():
        raise RuntimeError(
            f"the fused walk got {device.type} tensors with triton {'' if interpreting() else 'not '}interpreting: "
            "CPU tensors need TRITON_INTERPRET=1 set before triton is imported, CUDA tensors need it unset"
        )
    if b & (b - 1) or b < 8:
        raise ValueError(f"block size {b}: the fused walk needs a power of two >= 8")
    changed = torch.zeros(1, dtype=torch.int32, device=device)
    if not positions:
        return changed[0].to(torch.int64)
    consts = upload([tie, TINY], dtype, device)
    where = upload(list(positions), torch.int64, device)
    M8 = M_k.view(torch.uint8)  # the same storage: the kernel's stores update the mask
    L4 = L_k.view(R, b, nk, b)
    LAUNCHES["walk_column_block"] += 1
    _walk_kernel[(R, nk)](
        L4, S_k, M8, AtA, a_norm2,
        tables.Q.contiguous(), tables.T.contiguous(), tables.BHBt.contiguous(), tables.supports.flat,
        where, where.numel(), consts, changed,
        *L4.stride(), *S_k.stride(), *M8.stride(), *AtA.stride(), *a_norm2.stride(),
        B=b, NB=nb, num_warps=default_num_warps(b), enable_fp_fusion=False,
    )  # fmt: skip
    return changed[0].to(torch.int64)

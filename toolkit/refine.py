"""Block refinement (docs/aa-svd-spec.md §6): after every linear of a transformer block is replaced, the block's
continuous parameters are trained end to end so that the compressed block, fed the compressed model's block
inputs ``X'``, reproduces the original block's outputs on the original inputs ``X``:

    min  MSE(block'(X'), block(X))        over   U, V of every low-rank linear     (low-rank methods)
                                                 A, B and the kept core values     (ARMOR; the 2:4 mask fixed)
                                                 the kept core values              (plain 2:4 baselines: A = B = I)
                                                 and every norm weight and bias of the block.

Both sides are cached before the refinement (``block(X)`` is the next block's original input anyway), so the target
is fixed. Schedule (spec §6): AdamW, learning rate 1e-4, weight decay 0.01, gradient-norm clipping at 1.0, a linear
warm-up over the first 10 % of the steps, then a cosine down to 0.1 × 1e-4; one optimiser step per
:data:`REFINE_BATCH` calibration sequences (gradients accumulated over the stream's batches); the batches of an epoch
in a seeded random order. The default number of epochs (:func:`default_epochs`) keeps about :data:`TARGET_STEPS`
steps per block whatever the calibration size.

Guarantees: the pruned positions of a 2:4 core stay exactly zero (the core enters the forward as ``S ⊙ M``; its
gradient and Adam's update are zero there), so the result is exact 2:4 in the same file format; and the refinement
never makes the block worse on its own loss — the loss over all calibration batches is measured before and after,
and a refinement that did not lower it (or diverged) is undone (``reverted`` in the report).

The trainable modules here (:class:`TrainableArmor`, :class:`TrainableLowRank`) exist only during the refinement:
the inference modules (:class:`backends.torch.inference.ArmorLinear`, :class:`backends.torch.lowrank.LowRankLinear`)
keep their factors frozen. This module imports torch; :mod:`toolkit.compress` imports it only to refine a block.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .models import get_submodule

REFINE_BATCH = 32  # calibration sequences per optimiser step
TARGET_STEPS = 200  # optimiser steps per block the default epoch count aims at
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0
WARMUP_FRACTION = 0.1
FINAL_LR_FRACTION = 0.1


def steps_per_epoch(n_batches: int, batch_size: int) -> int:
    """Optimiser steps per pass over ``n_batches`` stream batches of ``batch_size`` sequences: one step per
    :data:`REFINE_BATCH` sequences (whole stream batches, at least one per step)."""
    return math.ceil(n_batches / batches_per_step(batch_size))


def batches_per_step(batch_size: int) -> int:
    return max(1, REFINE_BATCH // batch_size)


def default_epochs(nsamples: int) -> int:
    """``max(1, round(TARGET_STEPS / ⌈nsamples / REFINE_BATCH⌉))``: about :data:`TARGET_STEPS` steps per block."""
    return max(1, round(TARGET_STEPS / math.ceil(nsamples / REFINE_BATCH)))


def learning_rate(step: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``: linear warm-up over the first
    ``⌈0.1 · total⌉`` steps (from ``lr / warm-up``), then a cosine from ``lr`` down to ``0.1 · lr`` at the last."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * total))
    if step < warmup:
        return LEARNING_RATE * (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return LEARNING_RATE * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------
# Trainable forms of the compressed linears
# ----------------------------------------------------------------------------------------------------------
def _parameter(array: np.ndarray, like: torch.Tensor, trainable: bool = True) -> torch.nn.Parameter:
    value = torch.as_tensor(np.asarray(array), dtype=like.dtype, device=like.device).clone()
    return torch.nn.Parameter(value, requires_grad=trainable)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


class TrainableLowRank(torch.nn.Module):
    """``y = U (V x) + bias`` with ``U`` (d_out, k) and ``V`` (k, d_in) trainable; the bias is the linear's own
    parameter."""

    def __init__(self, linear: torch.nn.Linear, result: Any) -> None:
        super().__init__()
        self.U = _parameter(result.U, linear.weight)
        self.V = _parameter(result.V, linear.weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def factors(self) -> dict[str, np.ndarray]:
        return {"U": _numpy(self.U), "V": _numpy(self.V)}


class TrainableArmor(torch.nn.Module):
    """``y = Ŵ x + bias``, ``Ŵ = blockdiag(A) · (S ⊙ M) · blockdiag(B)``: ``S`` (d_out, d_in) trainable with the mask
    ``M`` fixed, ``A`` (R, b, b) and ``B`` (K, b, b) trainable unless ``frozen`` (a plain 2:4 baseline keeps
    ``A = B = I``); the bias is the linear's own parameter. ``Ŵ`` is formed once per forward: ``O(d_out d_in b)``,
    less than the products with a batch of more than ``b`` tokens."""

    def __init__(self, linear: torch.nn.Linear, result: Any, frozen: bool = False) -> None:
        super().__init__()
        weight = linear.weight
        self.A = _parameter(result.A, weight, not frozen)
        self.B = _parameter(result.B, weight, not frozen)
        self.S = _parameter(np.asarray(result.S) * np.asarray(result.M), weight)
        self.register_buffer("M", torch.as_tensor(np.asarray(result.M), dtype=weight.dtype, device=weight.device))
        self.bias = linear.bias

    def weight(self) -> torch.Tensor:
        """``blockdiag(A) · (S ⊙ M) · blockdiag(B)`` (d_out, d_in)."""
        R, b, _ = self.A.shape
        K = self.B.shape[0]
        core = (self.S * self.M).reshape(R * b, K, b)
        SB = torch.einsum("okj,kji->oki", core, self.B).reshape(R, b, K * b)  # S · blockdiag(B)
        return torch.einsum("rij,rjk->rik", self.A, SB).reshape(R * b, K * b)  # blockdiag(A) · …

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def factors(self) -> dict[str, np.ndarray]:
        mask = self.M.detach().cpu().numpy().astype(bool)
        return {"A": _numpy(self.A), "B": _numpy(self.B), "S": _numpy(self.S * self.M), "M": mask}


def trainable(linear: torch.nn.Linear, result: Any) -> torch.nn.Module:
    """The trainable stand-in for ``linear`` with the factors of ``result``: low-rank (``U``, ``V``) or 2:4
    (``A``, ``B``, ``S``, ``M``; a plain 2:4 baseline, ``proxy == "none"``, keeps ``A`` and ``B`` frozen)."""
    if hasattr(result, "U"):
        return TrainableLowRank(linear, result)
    return TrainableArmor(linear, result, frozen=result.proxy == "none")


# ----------------------------------------------------------------------------------------------------------
# The refinement of one block
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Refinement:
    """What a block's refinement changed: the factors of each refined linear (``{rel: {"U": …, "V": …}}`` or
    ``A``/``B``/``S``/``M``; empty when reverted), the refined 1-D parameters (norm weights, biases) by their name in
    the block, and the report (epochs, steps, the block loss before, after (as kept) and as trained, seconds,
    ``reverted``)."""

    factors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def block_loss(block: Any, inputs: list[tuple[Any, dict]], targets: list[Any], run_block: Any) -> float:
    """``MSE(block(X'), Y)`` over all calibration batches (every element weighs the same)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for (hidden, kwargs), target in zip(inputs, targets, strict=True):
            out = run_block(block, hidden, kwargs)
            total += float(((out - target) ** 2).double().sum())
            count += target.numel()
    return total / count


def refine_block(
    block: Any,
    linears: dict[str, Any],
    results: dict[str, Any],
    inputs: list[tuple[Any, dict]],
    targets: list[Any],
    epochs: int,
    batch_size: int,
    seed: int,
    run_block: Any,
    what: str,
) -> Refinement:
    """Refine ``block`` (its compressed ``linears`` by name, with their ``results``) on the stream batches
    ``inputs`` (the compressed model's block inputs and the block's keyword arguments) against ``targets`` (the
    original block's outputs, same batches) for ``epochs`` epochs; see the module docstring. The block is left with
    the refined (or, when reverted, its original) 1-D parameters; the linears are left as they were (their weights
    are set by the caller from the returned factors)."""
    t0 = time.perf_counter()
    per_step = batches_per_step(batch_size)
    total = epochs * steps_per_epoch(len(inputs), batch_size)
    before = block_loss(block, inputs, targets, run_block)
    params = {name: p for name, p in block.named_parameters() if p.ndim == 1}
    saved = {name: p.detach().clone() for name, p in params.items()}
    modules = {rel: trainable(linear, results[rel]) for rel, linear in linears.items()}
    _swap(block, modules)
    for p in params.values():
        p.requires_grad_(True)
    trained = [p for p in block.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(seed)
    sequences = sum(int(h.shape[0]) for h, _ in inputs)
    step = 0
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                order = rng.permutation(len(inputs))
                for start in range(0, len(order), per_step):
                    chosen = order[start : start + per_step]
                    weight_total = sum(int(inputs[j][0].shape[0]) for j in chosen)
                    optimizer.zero_grad(set_to_none=True)
                    for j in chosen:
                        hidden, kwargs = inputs[j]
                        out = run_block(block, hidden, kwargs)
                        loss = torch.nn.functional.mse_loss(out, targets[j]) * (hidden.shape[0] / weight_total)
                        loss.backward()
                    torch.nn.utils.clip_grad_norm_(trained, CLIP_NORM)
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(step, total)
                    optimizer.step()
                    step += 1
        after = block_loss(block, inputs, targets, run_block)
    finally:
        for p in block.parameters():
            p.requires_grad_(False)
        _swap(block, linears)
    reverted = not after < before  # a NaN (diverged) too
    refinement = Refinement()
    if reverted:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
    else:
        refinement.factors = {rel: module.factors() for rel, module in modules.items()}
        refinement.params = {name: p.detach().cpu().clone() for name, p in params.items()}
    refinement.report = {
        "epochs": epochs,
        "steps": step,
        "sequences": sequences,
        "block_loss_before": before,
        "block_loss_after": before if reverted else after,
        "block_loss_trained": after,  # what the training reached, also when it was undone
        "reverted": reverted,
        "seconds": time.perf_counter() - t0,
    }
    return refinement


def _swap(block: Any, modules: dict[str, Any]) -> None:
    """Put ``modules`` (by their path in the block) into the block."""
    for rel, module in modules.items():
        parent, _, child = rel.rpartition(".")
        setattr(get_submodule(block, parent) if parent else block, child, module)

"""Lemma 8 (PROOF.md §9): the anchored loss of any replacement is the hessian objective around the target
``T = W C_δ G'_δ⁻¹`` up to a constant, so ARMOR run on ``(T, G')`` (``armor-anchored``) keeps its guarantee on the
anchored loss: it ends at or below SparseGPT run on the same ``(T, G')``. Checked on hard two-stream layers whose
dimensions ARMOR's block sizes divide."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from armor_ref.baselines import prune_sparsegpt
from armor_ref.factorization import factorize
from armor_ref.lowrank import anchored_loss, anchored_target, damping_shift
from armor_ref.objectives import DEFAULT_DAMPING, hessian_loss
from verification.checkers import NOISE_FLOOR, check_trace_monotone, not_increased
from verification.profiles import scaled
from verification.strategies import SHIFT_SIZES, TwoStreamLayer, TwoStreamSpec, layer_specs


@st.composite
def blocked_two_stream_specs(draw: st.DrawFn) -> TwoStreamSpec:
    """A hard layer ARMOR can factorize (block sizes 4–16 dividing both dimensions) seen through two streams."""
    layer = draw(layer_specs(max_dim=48, block_sizes=(4, 8, 16)))
    return TwoStreamSpec(layer, drift=draw(st.sampled_from(SHIFT_SIZES)), noise=draw(st.sampled_from(SHIFT_SIZES)))


def anchored(layer: TwoStreamLayer, W_hat: np.ndarray, damping: float = DEFAULT_DAMPING) -> float:
    return anchored_loss(layer.W, W_hat, layer.G, layer.G_shift, layer.C, damping)


def loss_floor(layer: TwoStreamLayer) -> float:
    """Rounding noise of the anchored loss: ``NOISE_FLOOR`` of the loss of ``Ŵ = 0`` and of the target's own
    scale (the expanded form cancels terms of that size)."""
    D = damping_shift(layer.G_shift)
    T = anchored_target(layer.W, layer.G_shift, layer.C)
    return NOISE_FLOOR * (anchored(layer, 0 * layer.W) + hessian_loss(T, 0 * T, layer.G_shift + D)) * 1e3


@given(spec=blocked_two_stream_specs(), data=st.data())
def test_the_anchored_loss_is_the_hessian_objective_around_the_target(spec: TwoStreamSpec, data: st.DataObject):
    """``‖X Wᵀ − X' Ŵᵀ‖² + δ‖W − Ŵ‖² − tr((T − Ŵ) G'_δ (T − Ŵ)ᵀ)`` is the same number for every ``Ŵ``."""
    layer = spec.build()
    D = damping_shift(layer.G_shift)
    T = anchored_target(layer.W, layer.G_shift, layer.C)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    candidates = [layer.W, T, 0 * T, rng.standard_normal(T.shape) * (np.std(layer.W) or 1.0)]
    gaps = [anchored(layer, W_hat) - hessian_loss(T, W_hat, layer.G_shift + D) for W_hat in candidates]
    assert max(gaps) - min(gaps) <= loss_floor(layer) + 1e-9 * max(abs(g) for g in gaps), gaps


@given(spec=blocked_two_stream_specs())
def test_without_a_shift_the_target_is_the_weight(spec: TwoStreamSpec) -> None:
    """``X' = X``: ``T = W C_δ G'_δ⁻¹ = W``, and armor-anchored is armor-hessian."""
    layer = TwoStreamSpec(spec.layer).build()
    T = anchored_target(layer.W, layer.G_shift, layer.C)
    assert np.allclose(T, layer.W, rtol=1e-7, atol=1e-7 * (np.abs(layer.W).max() or 1.0))


@scaled(0.5)
@given(spec=blocked_two_stream_specs(), seed=st.integers(0, 3))
def test_armor_anchored_is_at_or_below_sparsegpt_on_the_same_target(spec: TwoStreamSpec, seed: int) -> None:
    """The guarantee carried over: ``factorize(T, G', "hessian")`` starts from SparseGPT on ``(T, G')``, never
    raises its loss, so on the anchored loss ARMOR-anchored ≤ SparseGPT-on-(T, G') (and the trace is monotone)."""
    layer = spec.build()
    T = anchored_target(layer.W, layer.G_shift, layer.C)
    b = spec.layer.block_size
    result = factorize(T, layer.G_shift, "hessian", block_size=b, sweeps=2, tol=0.0, seed=seed)
    assert result.init == "sparsegpt"
    S0, _ = prune_sparsegpt(T, layer.G_shift)
    floor = loss_floor(layer)
    assert check_trace_monotone(result.trace, rtol=1e-9, atol=floor) == []
    assert not_increased(anchored(layer, S0), anchored(layer, result.W_hat()), atol=floor)

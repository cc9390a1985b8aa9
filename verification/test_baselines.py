"""Lemma 3 (NoWag-P is the exact minimiser of the nowag loss over all 2:4 matrices, so it is ≤ every 2:4
baseline) and the SparseGPT oracle (the reference agrees with a literal OBS loop)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from armor_ref.baselines import BASELINES, prune_nowag_p, prune_sparsegpt, run_baseline
from armor_ref.masks import has_two_per_group
from armor_ref.objectives import nowag_loss
from verification.checkers import NOISE_FLOOR
from verification.profiles import scaled
from verification.slow_reference import brute_force_nowag_best, slow_sparsegpt
from verification.strategies import LayerSpec, layer_specs

#: tiny shapes with at most 6^4 = 1296 masks
TINY_SHAPES = [(1, 4), (1, 8), (2, 4), (3, 4), (1, 12), (1, 16), (2, 8), (4, 4)]


@st.composite
def tiny_specs(draw: st.DrawFn) -> LayerSpec:
    """A hard layer of a tiny shape (the block size is irrelevant here and set to 4)."""
    d_out, d_in = draw(st.sampled_from(TINY_SHAPES))
    spec = draw(layer_specs(max_dim=4, block_sizes=(4,)))
    return LayerSpec(**{**spec.__dict__, "d_out": d_out, "d_in": d_in, "n_calib": min(spec.n_calib, 2 * d_in)})


@scaled(0.5)
@given(spec=tiny_specs())
def test_nowag_p_is_optimal_over_all_2of4_matrices(spec: LayerSpec) -> None:
    layer = spec.build()
    best, _ = brute_force_nowag_best(layer.W, layer.h)
    S, M = prune_nowag_p(layer.W, layer.h)
    assert has_two_per_group(M)
    ours = nowag_loss(layer.W, S, layer.h)
    assert ours <= best * (1 + 1e-12) + NOISE_FLOOR * nowag_loss(layer.W, 0 * layer.W, layer.h)


@given(spec=layer_specs(max_dim=128))
def test_nowag_p_is_below_every_2of4_baseline(spec: LayerSpec) -> None:
    """NoWag-P ≤ min(magnitude, Wanda, SparseGPT) on the nowag loss (a corollary of the optimality above)."""
    layer = spec.build()
    losses = {name: nowag_loss(layer.W, run_baseline(name, layer.W, layer.gram)[0], layer.h) for name in BASELINES}
    nowag_p = losses.pop("nowag-p")
    floor = NOISE_FLOOR * nowag_loss(layer.W, 0 * layer.W, layer.h)
    for name, loss in losses.items():
        assert nowag_p <= loss * (1 + 1e-12) + floor, (name, nowag_p, loss)


@scaled(0.5)
@given(
    spec=layer_specs(max_dim=32, block_sizes=(4, 8), max_blocks=8).filter(lambda s: s.n_dup_weights == 0),
    block_size=st.sampled_from([4, 8, 12, 16, 128]),
)
def test_sparsegpt_matches_literal_obs(spec: LayerSpec, block_size: int) -> None:
    """``prune_sparsegpt`` (Cholesky factor, lazy column blocks) equals the literal OBS loop, for small and large
    column blocks. Duplicated weight columns are left out: they create exact saliency ties that either
    implementation may break by a rounding error."""
    layer = spec.build()
    S_ref, M_ref = prune_sparsegpt(layer.W, layer.gram, block_size=block_size)
    S_slow, M_slow = slow_sparsegpt(layer.W, layer.gram)
    assert np.array_equal(M_ref, M_slow)
    scale = max(float(np.abs(S_slow).max()), 1e-300)
    assert float(np.abs(S_ref - S_slow).max()) <= 1e-8 * scale

"""Lemma 6 (PROOF.md §8): each low-rank closed form of :mod:`armor_ref.lowrank` is the global minimiser of its
objective over rank ≤ k, and the anchored solution is below objectives 2 and 3 on the anchored loss; checked on
hard two-stream layers (rank-deficient and loud inputs, d_out ≠ d_in, shifts X' − X of several sizes)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from armor_ref import lowrank
from armor_ref.objectives import DEFAULT_DAMPING
from verification import lowrank_mutants as mutants
from verification.lowrank_checkers import (
    SOLVERS,
    Solver,
    StackedProblem,
    check_lowrank_solution,
    stacked_problem,
)
from verification.strategies import LayerSpec, TwoStreamLayer, TwoStreamSpec, two_stream_specs

#: damping strengths drawn by the properties: the lemma holds for every δ > 0, not only the default
DAMPINGS = (1e-4, DEFAULT_DAMPING, 1.0)


def draw_case(data: st.DataObject) -> tuple[TwoStreamLayer, int, float]:
    spec = data.draw(two_stream_specs(), label="spec")
    layer = spec.build()
    k = data.draw(st.integers(1, min(layer.W.shape)), label="rank")
    return layer, k, data.draw(st.sampled_from(DAMPINGS), label="damping")


def solve(objective: str, layer: TwoStreamLayer, k: int, damping: float) -> tuple[StackedProblem, lowrank.LowRank]:
    return stacked_problem(layer, objective, k, damping), SOLVERS[objective](layer.W, layer, k, damping)


@given(objective=st.sampled_from(lowrank.OBJECTIVES), data=st.data())
def test_closed_form_is_the_rank_k_optimum(objective: str, data: st.DataObject) -> None:
    """For every objective: the loss equals the solver-free optimum, the factor gradients vanish, and no
    perturbed factors, retracted tangent step or exact block minimiser does better."""
    layer, k, damping = draw_case(data)
    problem, f = solve(objective, layer, k, damping)
    assert check_lowrank_solution(problem, f, seed=layer.spec.layer.seed) == []


@given(data=st.data())
def test_anchored_is_below_svd_llm_and_shifted_on_the_anchored_loss(data: st.DataObject) -> None:
    """``L₄(W'₄) ≤ L₄(W'₂), L₄(W'₃)`` on the damped anchored loss (exactly: all three are rank ≤ k), and on the raw
    anchored loss up to the damping terms: ``L(W'₄) ≤ L(W'_j) + δ (‖W − W'_j‖² − ‖W − W'₄‖²)``."""
    layer, k, damping = draw_case(data)
    problem = stacked_problem(layer, "aa-svd", k, damping)
    W = layer.W
    W4, W2, W3 = (SOLVERS[name](W, layer, k, damping).weight() for name in ("aa-svd", "svd-llm", "shifted"))
    raw = stacked_problem(layer, "aa-svd", k, 0.0)
    delta = float(problem.Q[-1, -1]) ** 2  # the damping rows are √δ' I
    for name, Wj in (("svd-llm", W2), ("shifted", W3)):
        L4, Lj = problem.loss(W4), problem.loss(Wj)
        assert L4 <= Lj + problem.tolerance(Lj), f"anchored {L4} above {name} {Lj}"
        slack = delta * (np.sum((W - Wj) ** 2) - np.sum((W - W4) ** 2))
        assert raw.loss(W4) <= raw.loss(Wj) + slack + problem.tolerance(Lj), f"raw anchored loss above {name}'s"


@given(spec=two_stream_specs(), data=st.data())
def test_without_a_shift_objectives_2_3_4_coincide(spec: TwoStreamSpec, data: st.DataObject) -> None:
    """With ``X' = X`` the anchored, shifted and SVD-LLM objectives are one problem (damping included)."""
    layer = TwoStreamSpec(spec.layer).build()  # drift = noise = 0: X' = X
    k = data.draw(st.integers(1, min(layer.W.shape)), label="rank")
    problem = stacked_problem(layer, "svd-llm", k, DEFAULT_DAMPING)
    weights = [SOLVERS[name](layer.W, layer, k, DEFAULT_DAMPING).weight() for name in ("svd-llm", "shifted", "aa-svd")]
    losses = [problem.loss(w) for w in weights]
    assert max(losses) - min(losses) <= problem.tolerance(min(losses)), losses
    scale = max(float(np.linalg.norm(weights[0])), 1e-300)
    assert all(np.linalg.norm(w - weights[0]) <= 1e-8 * scale for w in weights[1:]) or _tied_at_k(problem)


def _tied_at_k(problem: StackedProblem) -> bool:
    """Whether the k-th and (k+1)-th singular values of the whitened matrix tie, so that the minimiser is not
    unique and equal losses are all that can be asked."""
    Q0, _ = np.linalg.qr(problem.Q)
    s = np.linalg.svd(Q0.T @ problem.P @ problem.W.T, compute_uv=False)
    return problem.k < len(s) and s[problem.k - 1] - s[problem.k] <= 1e-6 * s[0]


@given(spec=two_stream_specs(), data=st.data())
def test_plain_svd_reaches_eckart_young(spec: TwoStreamSpec, data: st.DataObject) -> None:
    """``‖W − W_k‖²_F = Σ_{i>k} σ_i(W)²``, and the stored factors are balanced: ``UᵀU = V Vᵀ = Σ_k``."""
    W = spec.build().W
    k = data.draw(st.integers(1, min(W.shape)), label="rank")
    U, V = lowrank.plain_svd(W, k)
    s = np.linalg.svd(W, compute_uv=False)
    scale = float(np.sum(s**2))
    assert abs(lowrank.plain_svd_loss(W, U @ V) - float(np.sum(s[k:] ** 2))) <= 1e-12 * scale
    assert np.allclose(U.T @ U, np.diag(s[:k]), atol=1e-10 * s[0]) and np.allclose(V @ V.T, U.T @ U, atol=1e-10 * s[0])


@given(data=st.data())
def test_loss_functions_equal_the_objectives(data: st.DataObject) -> None:
    """``anchored_loss`` and ``output_loss`` (from Gram matrices) equal the stacked least-squares losses (from
    the activations), at the solution and at an arbitrary matrix, damped and raw."""
    layer, k, damping = draw_case(data)
    W = layer.W
    arbitrary = np.random.default_rng(layer.spec.layer.seed).standard_normal(W.shape)
    for damp in (damping, 0.0):
        for name, loss in (
            ("aa-svd", lambda Wl, d: lowrank.anchored_loss(W, Wl, layer.G, layer.G_shift, layer.C, d)),
            ("svd-llm", lambda Wl, d: lowrank.output_loss(W, Wl, layer.G, d)),
            ("shifted", lambda Wl, d: lowrank.output_loss(W, Wl, layer.G_shift, d)),
            ("svd", lambda Wl, d: lowrank.plain_svd_loss(W, Wl)),
        ):
            problem = stacked_problem(layer, name, k, damp)
            for W_low in (SOLVERS[name](W, layer, k, damping).weight(), arbitrary):
                expected = problem.loss(W_low)
                scale = problem.scale + float(np.sum((problem.Q @ W_low.T) ** 2))
                assert abs(loss(W_low, damp) - expected) <= 1e-9 * scale, (name, damp)


@given(ratio=st.floats(1e-3, 1.0), d_out=st.integers(1, 5000), d_in=st.integers(1, 5000))
def test_rank_for_ratio_keeps_at_most_the_ratio(ratio: float, d_out: int, d_in: int) -> None:
    """``k (d_out + d_in) ≤ ρ d_out d_in < (k + 1)(d_out + d_in)``, or a clear error when even k = 1 is too many."""
    budget = ratio * d_out * d_in
    if budget * (1 + 1e-9) < d_out + d_in:
        with pytest.raises(ValueError, match="raise the ratio"):
            lowrank.rank_for_ratio(ratio, d_out, d_in)
        return
    k = lowrank.rank_for_ratio(ratio, d_out, d_in)
    assert k * (d_out + d_in) <= budget * (1 + 1e-9) and budget < (k + 1) * (d_out + d_in)
    assert 1 <= k < min(d_out, d_in)  # ρ ≤ 1 never reaches full rank: d_out d_in / (d_out + d_in) < min


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_rank_for_ratio_rejects_ratios_outside_0_1(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        lowrank.rank_for_ratio(ratio, 64, 64)


def test_decimal_ratios_are_not_cut_by_rounding() -> None:
    """``ρ = 0.6`` of a 100 × 150 layer is exactly 36 ranks; binary rounding must not make it 35."""
    assert lowrank.rank_for_ratio(0.6, 100, 150) == 36
    assert lowrank.rank_for_ratio(0.5, 384, 384) == 96


def test_undamped_rank_deficient_gram_is_a_clear_error() -> None:
    layer = TwoStreamSpec(LayerSpec(seed=0, d_out=8, d_in=16, block_size=1, n_calib=4)).build()
    with pytest.raises(ValueError, match="damping > 0"):
        lowrank.aa_svd(layer.W, layer.G_shift, layer.C, 3, damping=0.0)


# ----------------------------------------------------------------------------------------------------------
# Does the property have teeth? (PROOF.md, "Does the suite have teeth?")
# ----------------------------------------------------------------------------------------------------------
#: fixed, mildly hard two-stream layers: correlated inputs, two loud channels, d_out ≠ d_in, a realistic shift
SPECS = [
    TwoStreamSpec(
        LayerSpec(seed=seed, d_out=12, d_in=20, block_size=1, n_calib=30, correlated=True, n_loud=2),
        drift=0.1,
        noise=0.1,
    )
    for seed in range(3)
]

ANCHORED_MUTANTS = [
    mutants.aa_svd_without_inverse_whitening,
    mutants.aa_svd_unwhitened_at_the_end,
    mutants.aa_svd_cross_gram_transposed,
    mutants.aa_svd_original_gram_as_cross,
    mutants.aa_svd_truncating_the_target,
    mutants.aa_svd_undamped_cross_gram,
]


@pytest.mark.parametrize("mutant", ANCHORED_MUTANTS, ids=lambda m: m.__name__)
def test_optimality_checker_catches_anchored_mutant(mutant: Solver) -> None:
    reports = []
    for spec in SPECS:
        layer = spec.build()
        problem = stacked_problem(layer, "aa-svd", 5, DEFAULT_DAMPING)
        reports.append(check_lowrank_solution(problem, mutant(layer.W, layer, 5, DEFAULT_DAMPING)))
    assert all(reports), f"{mutant.__name__} slipped through on some layer: {reports}"


def test_optimality_checker_passes_the_reference_on_the_same_layers() -> None:
    """The control: on exactly the layers above, every reference solver passes."""
    for spec in SPECS:
        layer = spec.build()
        for objective in lowrank.OBJECTIVES:
            problem, f = solve(objective, layer, 5, DEFAULT_DAMPING)
            assert check_lowrank_solution(problem, f) == [], objective

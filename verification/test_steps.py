"""Lemma 1 (every continuous step is an exact block minimiser) and Lemma 2 (the discrete step picks the best of
the 6 supports, and changes a support only on a strict decrease), checked on hard generated layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from armor_ref.baselines import run_baseline
from armor_ref.factorization import Factors, a_step, b_step, core_values_step, factorize, initial_factors
from armor_ref.masks import SUPPORTS
from armor_ref.objectives import make_problem
from verification.checkers import (
    MONOTONE_RTOL,
    NOISE_FLOOR,
    check_a_step,
    check_b_step,
    check_core_step,
    check_discrete_batch,
    check_trace_monotone,
    perturbed,
)
from verification.compat import support_costs
from verification.profiles import scaled
from verification.strategies import LayerSpec, layer_specs, proxies


def generic_point(spec: LayerSpec, proxy: str, init: str = "nowag-p"):  # type: ignore[no-untyped-def]
    """The problem and a perturbed starting point ``initial_factors(baseline)`` + noise for a drawn layer."""
    layer = spec.build()
    problem = make_problem(layer.W, layer.gram, proxy)
    S0, M0 = run_baseline(init, layer.W, layer.gram)
    f = initial_factors(problem, S0, M0, layer.block_size)
    return problem, perturbed(f, np.random.default_rng(spec.seed))


@given(spec=layer_specs(max_dim=128), proxy=proxies)
def test_a_step_is_exact_minimiser(spec: LayerSpec, proxy: str) -> None:
    problem, f = generic_point(spec, proxy)
    assert check_a_step(problem, f) == []


@given(spec=layer_specs(max_dim=128), proxy=proxies)
def test_b_step_is_exact_minimiser(spec: LayerSpec, proxy: str) -> None:
    problem, f = generic_point(spec, proxy)
    assert check_b_step(problem, f) == []


@given(spec=layer_specs(max_dim=64), proxy=proxies)
def test_core_values_step_is_exact_minimiser(spec: LayerSpec, proxy: str) -> None:
    problem, f = generic_point(spec, proxy)
    assert check_core_step(problem, f) == []


@given(spec=layer_specs(max_dim=64), proxy=proxies)
def test_default_core_values_step_never_increases_the_loss(spec: LayerSpec, proxy: str) -> None:
    """The budgeted CG (``CORE_CG_ITERATIONS``, the schedule's default) need not converge, but never increases L."""
    problem, f = generic_point(spec, proxy)
    assert check_core_step(problem, f, step=core_values_step, exact=False) == []


@scaled(0.5)
@given(spec=layer_specs(max_dim=32, block_sizes=(4, 8, 16)), proxy=proxies, data=st.data())
def test_discrete_batch_picks_best_support(spec: LayerSpec, proxy: str, data: st.DataObject) -> None:
    """One batch of ``update_group`` calls (one group per tile: nowag all column blocks, hessian one) against brute
    force over the 6 supports, at a generic point after an A- and B-step (so the wrappers are not identity)."""
    problem, f = generic_point(spec, proxy)
    a_step(problem, f)
    b_step(problem, f)
    R, K, b = f.A.shape[0], f.B.shape[0], f.block_size
    if problem.diagonal:
        ks = slice(0, K)
    else:
        k = data.draw(st.integers(0, K - 1), label="column block")
        ks = slice(k, k + 1)
    nk = ks.stop - ks.start
    rng = np.random.default_rng(spec.seed + 1)
    p = rng.integers(0, b, size=(R, nk))
    g = rng.integers(0, b // 4, size=(R, nk))
    assert check_discrete_batch(problem, f, ks, p, g) == []


@given(seed=st.integers(0, 2**32 - 1), rank=st.integers(0, 4), a_norm2=st.sampled_from([1e-6, 1.0, 1e4]))
def test_support_costs_against_brute_force(seed: int, rank: int, a_norm2: float) -> None:
    """``best_support`` gives, for every support, the minimum of ``φ(u) = ‖a‖² uᵀQu − 2uᵀℓ`` over ``u`` on it,
    also for a singular ``Q`` (rank 0–4, ``ℓ`` in its range, as it always is: Lemma 2 in PROOF.md)."""
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((4, rank))
    Q = V @ V.T
    ell = Q @ rng.standard_normal(4)
    u, cost = support_costs(Q, ell, np.asarray(a_norm2))
    for sid, s in enumerate(SUPPORTS):
        Qs, ls = Q[np.ix_(s, s)], ell[s]
        # brute force: the minimum over a fine search is never below the closed form, and the closed form's
        # u attains its cost
        phi = a_norm2 * u[sid] @ Q @ u[sid] - 2 * u[sid] @ ell
        assert np.isclose(phi, cost[sid], rtol=1e-9, atol=1e-9 * (1 + abs(cost[sid])))
        assert np.all(u[sid][[t for t in range(4) if t not in s]] == 0)
        grad = 2 * a_norm2 * Qs @ u[sid][s] - 2 * ls
        scale = 2 * np.linalg.norm(ls) + 2 * a_norm2 * np.linalg.norm(Qs @ u[sid][s])
        assert np.linalg.norm(grad) <= 1e-7 * scale + 1e-300
        trials = u[sid][s][None, :] + rng.standard_normal((200, 2)) * (1e-3 + np.abs(u[sid][s]).max())
        values = a_norm2 * np.einsum("ni,ij,nj->n", trials, Qs, trials) - 2 * trials @ ls
        assert np.all(values >= cost[sid] - 1e-9 * (1 + abs(cost[sid])))


def test_checkers_see_a_non_identity_point() -> None:
    """Guard: the generic point really is generic (A, B not identity), so exactness is tested in earnest."""
    problem, f = generic_point(LayerSpec(seed=1, d_out=8, d_in=16, block_size=8), "hessian")
    assert isinstance(f, Factors)
    assert not np.allclose(f.A, np.eye(8)) and not np.allclose(f.B, np.eye(8))


EXACT_FIT = LayerSpec(
    seed=3,
    d_out=16,
    d_in=16,
    block_size=16,
    n_calib=32,
    student_t_dof=5.0,
    n_dead=1,
    n_loud=1,
    loud_scale=30.0,
    n_dup_inputs=1,
    n_dup_weights=1,
    n_zero_rows=1,
)


def test_steps_at_an_exact_fit_rise_by_rounding_only() -> None:
    """At an exact fit the computed loss is rounding noise, and a step can raise it: with the reference (which undoes
    nothing) the B-step of sweep 1 moves the loss from 2.8e-23 to 3.3e-23 here, while the data's scale L(0) is
    2.3e4. Every rise of the trace stays below the documented floor ``NOISE_FLOOR · L(0)``, and the run really is
    at an exact fit (so this is the regime the floor is for)."""
    layer = EXACT_FIT.build()
    result = factorize(layer.W, layer.gram, "nowag", init="sparsegpt", block_size=16, sweeps=2, tol=0.0)
    L0 = make_problem(layer.W, layer.gram, "nowag").loss(np.zeros_like(layer.W))
    assert result.loss <= 1e-20 * L0
    assert check_trace_monotone(result.trace, rtol=0.0, atol=NOISE_FLOOR * L0) == []


#: found by the thorough profile: rank-1 calibration, Cauchy weights; B grows to 8e4 and P_r H P_rᵀ has κ ≈ 1e12
SQUARED_KAPPA = LayerSpec(
    seed=520783053,
    d_out=64,
    d_in=16,
    block_size=16,
    n_calib=1,
    student_t_dof=1.0,
    n_loud=1,
    loud_scale=30.0,
    n_dup_weights=2,
)


def squared_kappa_trace() -> tuple[list[dict], float]:
    layer = SQUARED_KAPPA.build()
    result = factorize(layer.W, layer.gram, "hessian", init="nowag-p", block_size=16, sweeps=2, tol=0.0)
    return result.trace, make_problem(layer.W, layer.gram, "hessian").loss(np.zeros_like(layer.W))


def test_least_squares_a_and_b_steps_monotone_when_normal_equations_are_ill_conditioned() -> None:
    """Once a reproducer of an A-step rise of 1e-13 · L(0) (the A-step then solved the normal equations
    ``P_r H P_rᵀ``, squaring κ to ~1e12). The A- and B-steps are now least-squares solves on ``P_r F`` and ``Q_k``:
    none of them raises the computed loss here, not even by rounding, and the run reaches an exact fit."""
    trace, L0 = squared_kappa_trace()
    for prev, cur in itertools.pairwise(trace):
        if cur["step"] in ("A", "B"):
            assert cur["loss"] <= prev["loss"], cur
    assert min(e["loss"] for e in trace) <= 1e-20 * L0


@pytest.mark.xfail(
    strict=True,
    reason="finding: the core step's CG works on the normal equations and, at this ill-conditioned exact fit, "
    "raises the computed loss by 9e-15 · L(0) (above the floor); see PROOF.md, Tolerances",
)
def test_core_step_monotone_when_normal_equations_are_ill_conditioned() -> None:
    trace, L0 = squared_kappa_trace()
    assert check_trace_monotone(trace, rtol=MONOTONE_RTOL, atol=NOISE_FLOOR * L0) == []

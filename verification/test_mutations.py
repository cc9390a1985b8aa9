"""Mutation checks: the same checkers that pass on the reference must report a violation when a step is
deliberately wrong (PROOF.md, "Does the suite have teeth?"). The mutants live in :mod:`verification.mutants`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from armor_ref import factorization
from armor_ref.baselines import run_baseline
from armor_ref.factorization import Factors, a_step, b_step, initial_factors
from armor_ref.objectives import Problem, damped, hessian_loss, make_problem, nowag_loss
from verification import mutants
from verification.checkers import (
    check_a_step,
    check_b_step,
    check_core_step,
    check_discrete_batch,
    check_result,
    perturbed,
)
from verification.strategies import LayerSpec

#: fixed, mildly hard layers: correlated inputs (so H couples columns), two loud channels, d_out != d_in
SPECS = [
    LayerSpec(seed=seed, d_out=16, d_in=32, block_size=8, n_calib=48, correlated=True, n_loud=2) for seed in range(3)
]


def point(spec: LayerSpec, proxy: str) -> tuple[Problem, Factors]:
    layer = spec.build()
    problem = make_problem(layer.W, layer.gram, proxy)
    S0, M0 = run_baseline("nowag-p", layer.W, layer.gram)
    return problem, perturbed(initial_factors(problem, S0, M0, spec.block_size), np.random.default_rng(spec.seed))


STEP_MUTANTS = [
    ("nowag", check_b_step, mutants.b_step_weights_left_in),
    ("hessian", check_b_step, mutants.b_step_unweighted),
    ("hessian", check_b_step, mutants.b_step_without_Hkk_inverse),
    ("nowag", check_a_step, mutants.a_step_without_H),
    ("hessian", check_a_step, mutants.a_step_without_H),
    ("nowag", check_core_step, mutants.core_step_without_H),
    ("hessian", check_core_step, mutants.core_step_without_H),
]


@pytest.mark.parametrize(("proxy", "checker", "mutant"), STEP_MUTANTS, ids=lambda x: getattr(x, "__name__", x))
def test_step_checker_catches_mutant(proxy: str, checker: Callable[..., list[str]], mutant: Callable) -> None:
    reports = [checker(*point(spec, proxy), step=mutant) for spec in SPECS]
    assert all(reports), f"{mutant.__name__} slipped through on some layer: {reports}"


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_step_checkers_pass_the_reference_on_the_same_layers(proxy: str) -> None:
    """The control: on exactly the layers above, the correct steps are not reported."""
    for spec in SPECS:
        problem, f = point(spec, proxy)
        assert check_a_step(problem, f) == [] and check_b_step(problem, f) == [] and check_core_step(problem, f) == []


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_discrete_checker_catches_sign_slip(proxy: str) -> None:
    caught = []
    for spec in SPECS:
        problem, f = point(spec, proxy)
        a_step(problem, f)
        b_step(problem, f)
        R, K = f.A.shape[0], f.B.shape[0]
        ks = slice(0, K) if problem.diagonal else slice(0, 1)
        nk = ks.stop - ks.start
        p, g = np.full((R, nk), 3), np.full((R, nk), 1)
        assert check_discrete_batch(problem, f, ks, p, g) == []  # control
        caught.append(bool(check_discrete_batch(problem, f, ks, p, g, update=mutants.update_group_sign_slip)))
    assert all(caught)


#: every mutant patched into the reference under the name it replaces, and the trace step it corrupts
WHOLE_RUN_MUTANTS = [
    ("nowag", "b_step", "B", mutants.b_step_weights_left_in),
    ("hessian", "b_step", "B", mutants.b_step_unweighted),
    ("hessian", "b_step", "B", mutants.b_step_without_Hkk_inverse),
    ("nowag", "a_step", "A", mutants.a_step_without_H),
    ("hessian", "a_step", "A", mutants.a_step_without_H),
    ("nowag", "core_values_step", "core", mutants.core_step_without_H),
    ("hessian", "core_values_step", "core", mutants.core_step_without_H),
    ("nowag", "update_group", "discrete", mutants.update_group_sign_slip),
    ("hessian", "update_group", "discrete", mutants.update_group_sign_slip),
]
WHOLE_RUN_SWEEPS = 4


def whole_run_reports(spec: LayerSpec, proxy: str) -> list[str]:
    """``check_result`` of a ``factorize`` run (``WHOLE_RUN_SWEEPS`` sweeps, ``tol = 0``) on ``spec``'s layer, with
    the proxy loss computed from :mod:`armor_ref.objectives` directly."""
    layer = spec.build()
    if proxy == "nowag":

        def loss(W_hat: np.ndarray) -> float:
            return nowag_loss(layer.W, W_hat, layer.h)
    else:
        H = damped(layer.gram)

        def loss(W_hat: np.ndarray) -> float:
            return hessian_loss(layer.W, W_hat, H)

    result = factorization.factorize(
        layer.W, layer.gram, proxy, block_size=spec.block_size, sweeps=WHOLE_RUN_SWEEPS, tol=0.0
    )
    return check_result(result, loss)


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_whole_run_checker_passes_the_reference(proxy: str) -> None:
    """The control of the test below: the unmodified reference, same layers, same checker, nothing reported."""
    for spec in SPECS:
        assert whole_run_reports(spec, proxy) == []


@pytest.mark.parametrize(
    ("proxy", "name", "step", "mutant"), WHOLE_RUN_MUTANTS, ids=lambda x: getattr(x, "__name__", x)
)
def test_whole_run_checker_catches_mutant(
    monkeypatch: pytest.MonkeyPatch, proxy: str, name: str, step: str, mutant: Callable
) -> None:
    """End to end: with the wrong step patched into ``armor_ref.factorization``, the result checker (the trace never
    rises, ARMOR ≤ its baseline, the reported loss is the true one) reports a violation on every layer, and one
    that names the patched step. Nothing is undone in the reference, so a wrong step shows in the trace."""
    monkeypatch.setattr(factorization, name, mutant)
    for spec in SPECS:
        reports = whole_run_reports(spec, proxy)
        assert any(f"step {step}:" in line for line in reports), f"{mutant.__name__} not caught on {spec}: {reports}"


def test_every_mutant_is_tried_step_by_step_and_end_to_end() -> None:
    """Each function in :mod:`verification.mutants` has a step-level test and a whole-run test above."""
    defined = {
        name
        for name, value in vars(mutants).items()
        if callable(value) and getattr(value, "__module__", "") == mutants.__name__ and not name.startswith("_")
    }
    step_level = {m.__name__ for _, _, m in STEP_MUTANTS} | {mutants.update_group_sign_slip.__name__}
    end_to_end = {m.__name__ for *_, m in WHOLE_RUN_MUTANTS}
    assert defined == step_level == end_to_end

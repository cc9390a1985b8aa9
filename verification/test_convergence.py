"""Lemmas 4–5: the loss sequence converges, the improvements shrink to 0, and the final iterate is block-wise
stationary (continuous gradients ~0, no group can strictly improve)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from armor_ref.baselines import run_baseline
from armor_ref.factorization import DEFAULT_INIT, initial_factors, run_bcd
from armor_ref.objectives import make_problem
from verification.checkers import check_converged
from verification.profiles import scaled
from verification.strategies import LayerSpec, layer_specs, proxies

SWEEPS = 300


@scaled(0.5)
@given(spec=layer_specs(max_dim=16, block_sizes=(4, 8)), proxy=proxies)
def test_bcd_converges_to_a_blockwise_stationary_point(spec: LayerSpec, proxy: str) -> None:
    layer = spec.build()
    problem = make_problem(layer.W, layer.gram, proxy)
    S0, M0 = run_baseline(DEFAULT_INIT[proxy], layer.W, layer.gram)
    f = initial_factors(problem, S0, M0, layer.block_size)
    trace, _ = run_bcd(problem, f, SWEEPS, 0.0, np.random.default_rng(spec.seed))
    assert check_converged(problem, f, trace) == []


#: found by the thorough profile (2026-11-22): Cauchy weights, 6 calibration rows for 12 inputs, 3 dead and 3 loud
#: channels. The loss falls steadily (0.87 → 0.16 in 300 sweeps, every step exact, factors bounded, mask settled)
#: but slowly: the continuous blocks are strongly coupled, the classic "swamp" of block coordinate descent. Lemma 4
#: (the improvements tend to 0) holds; the rate the checker asks for (last sweep ≤ 1e-3 of the total after 300
#: sweeps) is not a theorem, and this layer breaks it.
SLOW_SWAMP = LayerSpec(
    seed=15226709,
    d_out=16,
    d_in=12,
    block_size=4,
    n_calib=6,
    student_t_dof=1.0,
    n_dead=3,
    n_loud=3,
    loud_scale=10.0,
)


@pytest.mark.xfail(strict=True, reason="slow (swamp) convergence: the 300-sweep rate is not a theorem; see PROOF.md")
def test_slow_swamp_converges_within_the_sweep_budget() -> None:
    layer = SLOW_SWAMP.build()
    problem = make_problem(layer.W, layer.gram, "nowag")
    S0, M0 = run_baseline("nowag-p", layer.W, layer.gram)
    f = initial_factors(problem, S0, M0, layer.block_size)
    trace, _ = run_bcd(problem, f, SWEEPS, 0.0, np.random.default_rng(SLOW_SWAMP.seed))
    losses = [e["loss"] for e in trace]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))  # the guarantee itself holds
    assert check_converged(problem, f, trace) == []

"""Lemmas 4–5: the loss sequence converges, the improvements shrink to 0, and the final iterate is block-wise
stationary (continuous gradients ~0, no group can strictly improve)."""

from __future__ import annotations

import numpy as np
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

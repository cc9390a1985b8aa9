"""The fast low-rank closed forms (``backends/lowrank.py``) against the plain reference (``armor_ref.lowrank``).

In float64 on NumPy and torch's CPU every objective's ``W' = U V`` and the anchored target equal the reference's to
1e-10 relative (the factors themselves only up to the sign of each singular pair); float32 keeps the optimum to
float32 round-off. CUDA cases run where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
from test_backends import ANY_BACKEND, FLOAT64_CPU

from armor_ref import lowrank as ref
from backends import get_lowrank
from backends import lowrank as fast
from backends.xp import make_namespace


def two_streams(d_out: int = 48, d_in: int = 64, n: int = 40, seed: int = 0):
    """A layer, its inputs ``X`` (fewer tokens than inputs: singular Grams) and drifted inputs ``X'``."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    X = rng.standard_normal((n, d_in)) * rng.uniform(0.1, 10, d_in)
    X_shift = X + 0.2 * X @ rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    return W, X.T @ X, X_shift.T @ X_shift, X.T @ X_shift


@pytest.mark.parametrize("objective", ref.OBJECTIVES)
@pytest.mark.parametrize("backend", FLOAT64_CPU)
def test_every_objective_equals_the_reference_in_float64(backend, objective):
    W, G, G_shift, C = two_streams()
    for k in (1, 17, 48):
        want = ref.solve_lowrank(objective, W, k, G, G_shift, C)
        got = get_lowrank(*backend)(objective, W, k, G, G_shift, C)
        assert got.U.shape == (48, k) and got.V.shape == (k, 64)
        scale = np.linalg.norm(want.weight())
        assert np.linalg.norm(got.weight() - want.weight()) <= 1e-10 * scale, (objective, k)
        # balanced factors: the same singular values in U and V, whatever the signs
        assert np.allclose(np.linalg.norm(got.U, axis=0), np.linalg.norm(want.U, axis=0), rtol=1e-9)


@pytest.mark.parametrize("backend", FLOAT64_CPU)
def test_anchored_target_equals_the_reference(backend):
    W, _, G_shift, C = two_streams()
    xp = make_namespace(backend[0], backend[1] if backend[0] == "torch" else None)
    got = xp.to_numpy(fast.anchored_target(xp.asarray(W), xp.asarray(G_shift), xp.asarray(C)))
    want = ref.anchored_target(W, G_shift, C)
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()


@pytest.mark.parametrize("backend", ANY_BACKEND)
def test_the_anchored_solution_is_optimal_in_the_working_dtype(backend):
    """float32 (and GPU) answers reach the reference's minimum of the damped anchored loss to round-off."""
    name, device, dtype, rtol = backend
    W, G, G_shift, C = two_streams()
    solve = get_lowrank(name, device)
    got = solve("aa-svd", W, 20, G, G_shift, C, **({"dtype": dtype} if dtype else {}))
    best = ref.anchored_loss(W, ref.aa_svd(W, G_shift, C, 20).weight(), G, G_shift, C)
    loss = ref.anchored_loss(W, got.weight(), G, G_shift, C)
    assert best <= loss <= best + 100 * rtol * ref.anchored_loss(W, 0 * W, G, G_shift, C)


def test_bad_requests_are_value_errors():
    W, G, G_shift, C = two_streams()
    with pytest.raises(ValueError, match="rank 0 is outside"):
        get_lowrank()("aa-svd", W, 0, G, G_shift, C)
    with pytest.raises(ValueError, match="unknown low-rank objective"):
        get_lowrank()("pca", W, 3, G, G_shift, C)
    with pytest.raises(ValueError, match="not positive definite"):
        get_lowrank()("svd-llm", W, 3, np.zeros_like(G) - np.eye(64), damping=0.0)

"""The CuPy backend (``backends/cupy``). Its code is written for the data's array module, so NumPy stands in for
CuPy on the CPU: those tests check the backend's logic against the reference everywhere; the CuPy runs themselves
need CuPy and an NVIDIA GPU and skip cleanly without them."""

from __future__ import annotations

import numpy as np
import pytest

from armor_ref import factorization as F
from armor_ref.baselines import BASELINES, run_baseline
from armor_ref.masks import has_two_per_group, select_2of4
from armor_ref.objectives import gram_matrix
from backends import BackendUnavailable, get_factorize
from backends.cupy import factorization as CF


def _cupy_factorize():
    try:
        return get_factorize("cupy", "cuda")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def make_layer(d_out=64, d_in=128, n=300, seed=0, dead=()):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    X = rng.standard_normal((n, d_in))
    X[:, [3, 17]] *= 30
    X[:, list(dead)] = 0
    return W, gram_matrix(X)


def losses(r):
    return np.array([e["loss"] for e in r.trace])


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_numpy_stand_in_matches_the_reference(proxy):
    W, H = make_layer(seed=1, dead=(9,))
    ref = F.factorize(W, H, proxy=proxy, block_size=16, sweeps=4, seed=2)
    got = CF.factorize(W, H, proxy=proxy, block_size=16, sweeps=4, seed=2, device=None)
    np.testing.assert_array_equal(got.M, ref.M)
    np.testing.assert_allclose(losses(got), losses(ref), rtol=1e-9)


def test_numpy_stand_in_selection_and_baselines():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((8, 16))
    scores[1, 4:8] = 2.0  # ties go to the lower column
    scores[2, :4] = [1.0, 3.0, 1.0, 3.0]
    np.testing.assert_array_equal(CF.select_2of4(scores), select_2of4(scores))
    W, H = make_layer(seed=3, dead=(5,))
    for name in BASELINES:
        S, M = CF.run_baseline(name, W, H)
        S_ref, M_ref = run_baseline(name, W, H)
        np.testing.assert_array_equal(M, M_ref)
        np.testing.assert_allclose(S, S_ref, rtol=1e-9, atol=1e-12)


def test_float32_stand_in_keeps_the_guarantee():
    W, H = make_layer(seed=4)
    r = CF.factorize(W, H, proxy="hessian", block_size=16, sweeps=3, device=None, dtype="float32")
    trace = losses(r)
    assert np.all(np.diff(trace) <= 1e-5 * trace[:-1]) and r.loss < r.baseline_loss
    assert has_two_per_group(r.M) and np.all(r.S[~r.M] == 0)


def test_adam_schedule_is_refused():
    W, H = make_layer(d_out=32, d_in=64)
    with pytest.raises(ValueError, match="bcd schedule only"):
        CF.factorize(W, H, block_size=16, schedule="adam", device=None)


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_cupy_on_gpu_keeps_the_guarantee_and_is_close(proxy):
    factorize = _cupy_factorize()
    W, H = make_layer(seed=5)
    r = factorize(W, H, proxy=proxy, block_size=16, sweeps=3)
    trace = losses(r)
    assert np.all(np.diff(trace) <= 1e-5 * trace[:-1]) and r.loss < r.baseline_loss
    assert has_two_per_group(r.M) and np.all(r.S[~r.M] == 0)
    r64 = factorize(W, H, proxy=proxy, block_size=16, sweeps=3, dtype="float64")
    ref = F.factorize(W, H, proxy=proxy, block_size=16, sweeps=3)
    np.testing.assert_allclose(losses(r64), losses(ref), rtol=1e-6)

import itertools

import numpy as np
import pytest

from armor_ref import factorization as F
from armor_ref.baselines import run_baseline
from armor_ref.masks import has_two_per_group
from armor_ref.objectives import gram_matrix, hessian_loss, make_problem, nowag_loss


def make_layer(d_out=32, d_in=64, n=120, seed=0, dead=(), outliers=()):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    X = rng.standard_normal((n, d_in))
    X[:, list(outliers)] *= 30
    X[:, list(dead)] = 0
    return W, gram_matrix(X)


def assert_monotone(trace):
    losses = np.array([e["loss"] for e in trace])
    assert np.all(np.diff(losses) <= 1e-9 * losses[:-1]), losses


def test_blockdiag_helpers_match_dense_products():
    rng = np.random.default_rng(0)
    A, B, S = rng.standard_normal((3, 4, 4)), rng.standard_normal((2, 4, 4)), rng.standard_normal((12, 8))
    expected = F.blockdiag_dense(A) @ S @ F.blockdiag_dense(B)
    np.testing.assert_allclose(F.reconstruct(A, S, B), expected)


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_factorize_improves_on_its_baseline_monotonically(proxy):
    W, H = make_layer()
    r = F.factorize(W, H, proxy=proxy, block_size=16, sweeps=4)
    assert_monotone(r.trace)
    assert r.loss < 0.9 * r.baseline_loss
    assert has_two_per_group(r.M) and np.all(r.S[~r.M] == 0)
    assert r.A.shape == (2, 16, 16) and r.B.shape == (4, 16, 16)
    # the recorded loss is the loss of the returned Ŵ, measured by the public proxy functions
    if proxy == "nowag":
        assert np.isclose(nowag_loss(W, r.W_hat(), np.diag(H)), r.loss)
    else:
        assert np.isclose(hessian_loss(W, r.W_hat(), make_problem(W, H, "hessian").H), r.loss)


def test_starting_loss_is_the_baselines_loss():
    W, H = make_layer()
    S, _ = run_baseline("sparsegpt", W, H)
    r = F.factorize(W, H, proxy="hessian", block_size=16, sweeps=1)
    assert np.isclose(r.baseline_loss, hessian_loss(W, S, make_problem(W, H, "hessian").H))


@pytest.mark.parametrize("init", ["magnitude", "wanda", "nowag-p", "sparsegpt"])
def test_any_baseline_can_start_and_is_never_beaten(init):
    W, H = make_layer(seed=3)
    r = F.factorize(W, H, proxy="hessian", init=init, block_size=16, sweeps=2)
    assert r.init == init and r.loss <= r.baseline_loss


def test_same_seed_same_result_and_other_seed_still_valid():
    W, H = make_layer(seed=1)
    a = F.factorize(W, H, proxy="nowag", block_size=16, sweeps=3, seed=7)
    b = F.factorize(W, H, proxy="nowag", block_size=16, sweeps=3, seed=7)
    np.testing.assert_array_equal(a.W_hat(), b.W_hat())
    c = F.factorize(W, H, proxy="nowag", block_size=16, sweeps=3, seed=8)
    assert c.loss <= c.baseline_loss


def test_dead_channels_and_rank_deficient_calibration_work():
    W, H = make_layer(d_out=16, d_in=64, n=20, dead=(0, 5, 6, 7), outliers=(9,))
    for proxy in ("nowag", "hessian"):
        r = F.factorize(W, H, proxy=proxy, block_size=8, sweeps=3)
        assert np.all(np.isfinite(r.W_hat()))
        assert_monotone(r.trace)


def test_tolerance_stops_early():
    W, H = make_layer()
    r = F.factorize(W, H, proxy="nowag", block_size=4, sweeps=200, tol=1e-2)
    assert r.sweeps < 200
    last_sweep = [e["loss"] for e in r.trace if e["sweep"] in (r.sweeps - 1, r.sweeps) and e["step"] == "discrete"]
    assert last_sweep[0] - last_sweep[-1] <= 1e-2 * last_sweep[0]


def test_nowag_factors_fold_the_normalisation():
    W, H = make_layer()
    r = F.factorize(W, H, proxy="nowag", block_size=16, sweeps=2)
    p = make_problem(W, H, "nowag")
    # the loss in the normalised space equals the loss of the folded (layer-scale) result
    assert np.isclose(p.loss(p.to_target_space(r.W_hat())), r.loss)


def test_discrete_step_leaves_no_improvable_group_at_a_fixed_point():
    W, H = make_layer(d_out=16, d_in=32)
    for proxy in ("nowag", "hessian"):
        problem = make_problem(W, H, proxy)
        S, M = run_baseline(F.DEFAULT_INIT[proxy], W, H)
        f = F.initial_factors(problem, S, M, 8)
        rng = np.random.default_rng(0)
        for _ in range(50):
            if F.discrete_step(problem, f, rng) == 0:
                break
        G = problem.times_H(problem.target - f.W_hat())
        assert not F.improvable_groups(f, G, F.all_group_tables(problem, f)).any()


def test_adam_schedule_returns_its_best_iterate():
    W, H = make_layer()
    r = F.factorize(W, H, proxy="nowag", block_size=16, sweeps=30, schedule="adam")
    assert r.schedule == "adam" and r.loss <= r.baseline_loss
    assert np.isclose(r.loss, min(e["loss"] for e in r.trace))
    assert has_two_per_group(r.M)


@pytest.mark.parametrize(
    "shape, block, message",
    [
        ((32, 64), 6, "multiple of 4"),
        ((30, 64), 16, "output dimension 30"),
        ((32, 62), 4, "input dimension 62"),
    ],
)
def test_bad_shapes_are_refused(shape, block, message):
    W = np.ones(shape)
    with pytest.raises(ValueError, match=message):
        F.factorize(W, np.eye(shape[1]), block_size=block)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tol": -1e-3}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"tol": float("inf")}, "tol"),
        ({"sweeps": -1}, "sweeps"),
        ({"sweeps": 2.5}, "sweeps"),
        ({"proxy": "l2"}, "unknown proxy"),
    ],
)
def test_bad_budget_or_settings_are_refused(settings, message):
    W, H = make_layer(d_out=16, d_in=32)
    with pytest.raises(ValueError, match=message):
        F.factorize(W, H, block_size=8, **settings)


def test_non_finite_inputs_are_refused():
    W, H = make_layer(d_out=16, d_in=32)
    W[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        F.factorize(W, H, block_size=8)


def test_the_trace_is_what_the_steps_did(monkeypatch):
    """Nothing is undone: every entry of the trace is the loss right after that step, also when a step raises it
    (here a deliberately bad core step that doubles the core), and entries carry sweep, step and loss only."""
    W, H = make_layer(d_out=16, d_in=32, seed=6)
    problem = make_problem(W, H, "hessian")
    S, M = run_baseline("sparsegpt", W, H)
    f = F.initial_factors(problem, S, M, 8)
    seen = []

    def recorded(name, step):
        def wrapped(*args):
            step(*args)
            seen.append((name, problem.loss(f.W_hat())))

        return wrapped

    def doubling_core_step(problem, f):
        f.S *= 2.0

    steps = {"A": F.a_step, "B": F.b_step, "core": doubling_core_step, "discrete": F.discrete_step}
    for name, fn in zip(steps, ("a_step", "b_step", "core_values_step", "discrete_step"), strict=True):
        monkeypatch.setattr(F, fn, recorded(name, steps[name]))
    trace, done = F.run_bcd(problem, f, 2, 0.0, np.random.default_rng(0))
    assert [(e["step"], e["loss"]) for e in trace[1:]] == seen and len(seen) == 4 * done
    assert all(cur["loss"] > prev["loss"] for prev, cur in itertools.pairwise(trace) if cur["step"] == "core")
    assert all(set(e) == {"sweep", "step", "loss"} for e in trace)

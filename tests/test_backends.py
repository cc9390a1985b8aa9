"""The fast implementation (``backends/``) against the plain reference (``armor_ref``).

Contract: in float64 the fast path makes the reference's decisions (the same masks, exactly) and its losses agree
to 1e-9 relative at every step of the trace, on NumPy and on torch's CPU; no step is reverted (a revert is the
production safety net for float32 round-off, never needed in float64 on these well-conditioned layers). float32
(torch CPU) keeps every guarantee to float32 round-off. CUDA and CuPy cases run where a GPU is present and skip
cleanly otherwise. The comparison is always with ``armor_ref.factorization.factorize`` itself, never a copy.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import cache

import numpy as np
import pytest

from armor_ref import baselines as ref_baselines
from armor_ref import factorization as ref
from armor_ref import masks as ref_masks
from armor_ref import objectives as ref_objectives
from backends import BACKENDS, BackendUnavailable, get_factorize
from backends import baselines as fast_baselines
from backends import factorization as fast
from backends import masks as fast_masks
from backends import objectives as fast_objectives
from backends.threads import current_limit, default_threads, limit_threads
from backends.xp import make_namespace

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
EQ_RTOL = 1e-9


def _cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


def _cupy() -> bool:
    try:
        get_factorize("cupy", "cuda")
    except BackendUnavailable:
        return False
    return True


#: float64 CPU libraries the equality contract is checked on: (backend, device)
FLOAT64_CPU = [
    pytest.param(("numpy", "cpu"), id="numpy"),
    pytest.param(("torch", "cpu"), id="torch-cpu", marks=needs_torch),
]
#: every backend this machine may have, in its default dtype, with the relative slack of its guarantee
ANY_BACKEND = [
    pytest.param(("numpy", "cpu", None, 1e-9), id="numpy-f64"),
    pytest.param(("torch", "cpu", None, 1e-9), id="torch-cpu-f64", marks=needs_torch),
    pytest.param(("torch", "cpu", "float32", 1e-5), id="torch-cpu-f32", marks=needs_torch),
    pytest.param(
        ("torch", "cuda", None, 1e-5), id="torch-cuda-f32", marks=pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")
    ),
    pytest.param(
        ("cupy", "cuda", None, 1e-5),
        id="cupy-f32",
        marks=pytest.mark.skipif(not _cupy(), reason="CuPy or a CUDA GPU is missing"),
    ),
]


@cache
def make_layer(d_out: int = 64, d_in: int = 128, seed: int = 0, dead: tuple[int, ...] = ()):
    """A random layer and the Gram matrix of correlated inputs with two outlier channels and optional dead ones."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    X = rng.standard_normal((300, d_in)) @ (np.eye(d_in) + 0.3 * rng.standard_normal((d_in, d_in)) / np.sqrt(d_in))
    X[:, [3, 17 % d_in]] *= 30
    X[:, list(dead)] = 0
    return W, ref_objectives.gram_matrix(X)


@cache
def reference_result(layer: tuple, **options) -> ref.ArmorResult:
    W, H = make_layer(*layer)
    return ref.factorize(W, H, **options)


def losses(result) -> np.ndarray:
    return np.array([entry["loss"] for entry in result.trace])


def assert_same_answers(got, want, loss_rtol: float = EQ_RTOL) -> None:
    """Same masks, same number of sweeps and steps, every loss of the trace to ``loss_rtol``, no revert."""
    assert not [e for e in got.trace if e.get("reverted")], "a step was reverted in float64"
    assert [(e["sweep"], e["step"]) for e in got.trace] == [(e["sweep"], e["step"]) for e in want.trace]
    assert got.sweeps == want.sweeps and got.init == want.init
    np.testing.assert_array_equal(got.M, want.M)
    np.testing.assert_allclose(losses(got), losses(want), rtol=loss_rtol, atol=0)
    assert abs(got.loss - want.loss) <= loss_rtol * want.loss


# ------------------------------------------------------------------------------------------------------------
# The equality contract in float64
# ------------------------------------------------------------------------------------------------------------
EQUALITY_CASES = [
    # (d_out, d_in, seed, dead), block size, sweeps
    pytest.param((64, 128, 1, ()), 16, 4, id="64x128-b16"),
    pytest.param((32, 64, 2, (5, 40)), 8, 4, id="32x64-b8-dead"),
    pytest.param((48, 96, 3, ()), 16, 3, id="48x96-b16"),
    pytest.param((64, 128, 4, ()), 32, 3, id="64x128-b32"),
]


@pytest.mark.parametrize("target", FLOAT64_CPU)
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
@pytest.mark.parametrize(("layer", "block_size", "sweeps"), EQUALITY_CASES)
def test_bcd_makes_the_reference_decisions(target, proxy, layer, block_size, sweeps):
    want = reference_result(layer, proxy=proxy, block_size=block_size, sweeps=sweeps, seed=7, tol=0.0)
    W, H = make_layer(*layer)
    got = get_factorize(*target)(W, H, proxy=proxy, block_size=block_size, sweeps=sweeps, seed=7, tol=0.0)
    assert_same_answers(got, want)
    assert sum(e["step"] == "discrete" for e in got.trace) == sweeps  # the discrete step ran every sweep
    assert not np.array_equal(got.M, ref.factorize(W, H, proxy=proxy, block_size=block_size, sweeps=0).M)


@pytest.mark.parametrize("target", FLOAT64_CPU)
@pytest.mark.parametrize("init", ref_baselines.BASELINES)
def test_every_init_baseline_gives_the_reference_decisions(target, init):
    layer = (32, 64, 5, (9,))
    W, H = make_layer(*layer)
    for proxy in ("nowag", "hessian"):
        want = reference_result(layer, proxy=proxy, init=init, block_size=8, sweeps=3)
        got = get_factorize(*target)(W, H, proxy=proxy, init=init, block_size=8, sweeps=3)
        assert_same_answers(got, want)
        assert got.baseline_loss == pytest.approx(want.baseline_loss, rel=EQ_RTOL)


@pytest.mark.parametrize("target", FLOAT64_CPU)
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_adam_schedule_makes_the_reference_decisions(target, proxy):
    """Started from SparseGPT, whose kept values carry a real gradient. (From a baseline that keeps the weights'
    own values, e.g. NoWag-P, the exact gradient on the kept entries is zero and its float64 rounding noise, whose
    sign Adam's ``m / √v`` turns into a full ``lr`` step, differs between libraries: the trajectories then agree to
    ~1e-7, not 1e-9, as checked below.)"""
    layer = (32, 64, 6, ())
    W, H = make_layer(*layer)
    options = dict(proxy=proxy, block_size=8, sweeps=6, schedule="adam", init="sparsegpt")
    assert_same_answers(get_factorize(*target)(W, H, **options), reference_result(layer, **options))
    options["init"] = "nowag-p"
    got, want = get_factorize(*target)(W, H, **options), reference_result(layer, **options)
    np.testing.assert_array_equal(got.M, want.M)
    np.testing.assert_allclose(losses(got), losses(want), rtol=1e-6)


@pytest.mark.parametrize("target", FLOAT64_CPU)
def test_on_sweep_and_tolerance_stop_as_in_the_reference(target):
    layer = (32, 64, 8, ())
    W, H = make_layer(*layer)
    seen_ref, seen_fast = [], []
    want = ref.factorize(W, H, proxy="nowag", block_size=8, sweeps=20, tol=0.05, on_sweep=lambda *a: seen_ref.append(a))
    got = get_factorize(*target)(
        W, H, proxy="nowag", block_size=8, sweeps=20, tol=0.05, on_sweep=lambda *a: seen_fast.append(a)
    )
    assert want.sweeps < 20  # the tolerance stopped it
    assert_same_answers(got, want)
    assert [s for s, _ in seen_fast] == [s for s, _ in seen_ref]
    np.testing.assert_allclose([v for _, v in seen_fast], [v for _, v in seen_ref], rtol=EQ_RTOL)


# ------------------------------------------------------------------------------------------------------------
# The guarantee on every backend present (float32 to its round-off)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ANY_BACKEND)
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_guarantee_on_every_backend(case, proxy):
    backend, device, dtype, slack = case
    W, H = make_layer(64, 128, 0, (5,))
    options = {} if dtype is None else {"dtype": dtype}
    r = get_factorize(backend, device)(W, H, proxy=proxy, block_size=16, sweeps=3, **options)
    trace = losses(r)
    # every step lowers the loss up to round-off: a reverted step's computed rise is round-off, nothing more
    for entry in r.trace:
        if entry.get("reverted"):
            assert entry["rise"] <= slack * entry["loss"], entry
    assert np.all(np.diff(trace) <= slack * trace[:-1]), trace
    assert r.loss <= r.baseline_loss * (1 + slack) and r.loss < 0.9 * r.baseline_loss
    assert isinstance(r.M, np.ndarray) and r.M.dtype == bool and ref_masks.has_two_per_group(r.M)
    assert np.all(r.S[~r.M] == 0)
    assert r.A.shape == (4, 16, 16) and r.B.shape == (8, 16, 16) and r.S.shape == W.shape
    # the recorded loss is the loss of the returned Ŵ, measured by the reference
    measured = ref_objectives.make_problem(W, H, proxy)
    measured = measured.loss(measured.to_target_space(r.W_hat()))
    assert measured == pytest.approx(r.loss, rel=1e-9 if slack == 1e-9 else 1e-4)


@needs_torch
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_float32_stays_close_to_the_reference(proxy):
    """float32 does not promise the reference's masks bit for bit (a gain below float32 resolution may go either
    way); it stays close in masks and loss."""
    layer = (64, 128, 5, ())
    W, H = make_layer(*layer)
    want = reference_result(layer, proxy=proxy, block_size=16, sweeps=4)
    got = get_factorize("torch", "cpu")(W, H, proxy=proxy, block_size=16, sweeps=4, dtype="float32")
    assert abs(got.loss - want.loss) <= 0.02 * want.loss
    assert np.mean(got.M == want.M) > 0.95


# ------------------------------------------------------------------------------------------------------------
# The pieces: baselines, masks, objectives, the walk
# ------------------------------------------------------------------------------------------------------------
def _namespaces() -> list:
    return [make_namespace("numpy", None)] + ([make_namespace("torch", "cpu")] if HAS_TORCH else [])


@pytest.mark.parametrize("xp", _namespaces(), ids=lambda xp: xp.name)
@pytest.mark.parametrize("name", ref_baselines.BASELINES)
def test_baselines_match_the_reference(xp, name):
    W, H = make_layer(32, 64, 2, (7,))
    S_ref, M_ref = ref_baselines.run_baseline(name, W, H)
    S, M = fast_baselines.run_baseline(name, xp.asarray(W), xp.asarray(H))
    np.testing.assert_array_equal(xp.to_numpy(M), M_ref)
    np.testing.assert_allclose(xp.to_numpy(S), S_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("xp", _namespaces(), ids=lambda xp: xp.name)
def test_select_2of4_breaks_ties_like_the_reference(xp):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((8, 16))
    scores[0, :4] = 1.0
    scores[1, 4:8] = [2.0, 3.0, 2.0, 3.0]
    scores[2, 8:12] = [0.0, 0.0, 5.0, 0.0]
    np.testing.assert_array_equal(
        xp.to_numpy(fast_masks.select_2of4(xp.asarray(scores))), ref_masks.select_2of4(scores)
    )
    with pytest.raises(ValueError, match="divisible by 4"):
        fast_masks.select_2of4(xp.asarray(scores[:, :6]))


@pytest.mark.parametrize("xp", _namespaces(), ids=lambda xp: xp.name)
def test_objectives_match_the_reference(xp):
    W, H = make_layer(32, 64, 3, (4,))
    W_hat = W * ref_masks.select_2of4(np.abs(W)) + 0.01
    h = np.diag(H)
    Wx, W_hatx, Hx = xp.asarray(W), xp.asarray(W_hat), xp.asarray(H)
    damped = ref_objectives.damped(H)
    assert fast_objectives.nowag_loss(Wx, W_hatx, xp.asarray(h)) == pytest.approx(
        ref_objectives.nowag_loss(W, W_hat, h), rel=1e-12
    )
    assert fast_objectives.hessian_loss(Wx, W_hatx, xp.asarray(damped)) == pytest.approx(
        ref_objectives.hessian_loss(W, W_hat, damped), rel=1e-12
    )
    assert fast_objectives.relative_output_error(Wx, W_hatx, Hx) == pytest.approx(
        ref_objectives.relative_output_error(W, W_hat, H), rel=1e-12
    )
    for proxy in ("nowag", "hessian"):
        p_ref, p_fast = ref_objectives.make_problem(W, H, proxy), fast_objectives.make_problem(Wx, Hx, proxy)
        assert p_fast.loss(p_fast.to_target_space(W_hatx)) == pytest.approx(
            p_ref.loss(p_ref.to_target_space(W_hat)), rel=1e-12
        )
    with pytest.raises(ValueError, match="unknown proxy"):
        fast_objectives.make_problem(Wx, Hx, "l2")


@pytest.mark.parametrize("xp", _namespaces(), ids=lambda xp: xp.name)
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_the_walk_keeps_its_state_consistent(xp, proxy):
    """After :func:`walk_column_block` on a column block, ``L`` is ``Aᵀ G Bᵀ`` of the new core (recomputed from
    scratch), the mask keeps 2 of every 4 and the core is zero outside it, and some supports did change: the
    invariants a fused kernel that replaces the walk must keep."""
    W, H = make_layer(32, 64, 9, ())
    with xp.scope():
        problem = fast_objectives.make_problem(xp.asarray(W), xp.asarray(H), proxy)
        S0, M0 = fast_baselines.run_baseline("magnitude", xp.asarray(W), xp.asarray(H))
        f = fast.initial_factors(problem, S0, M0, 8)
        for step in (fast.a_step, fast.b_step, fast.core_values_step):
            step(problem, f)
        R, b, K, nb = 4, 8, 8, 2
        At, Bt = fast.transpose_blocks(xp, f.A), fast.transpose_blocks(xp, f.B)

        def ell_first() -> object:  # Aᵀ G Bᵀ of the current factors
            G = problem.times_H(problem.target - f.W_hat())
            return fast.blockdiag_right(xp, fast.blockdiag_left(At, G), Bt)

        k = 2
        ks, cols = slice(k, k + 1), slice(k * b, (k + 1) * b)
        tables = fast.group_tables(xp, f.B, fast.diagonal_blocks(problem, b)).select(ks)
        L_k = xp.copy(ell_first()[:, cols]).reshape(R, b, b)
        S5, M5 = f.S.reshape(R, b, K, nb, 4), f.M.reshape(R, b, K, nb, 4)
        changed = fast.walk_column_block(
            xp, S5[:, :, ks], M5[:, :, ks], L_k, At @ f.A, (f.A * f.A).sum(1), tables,
            fast.TIE_TOLERANCE["float64"], list(range(b * nb)),
        )  # fmt: skip
        assert int(changed) > 0
        np.testing.assert_allclose(xp.to_numpy(L_k.reshape(-1, b)), xp.to_numpy(ell_first()[:, cols]), atol=1e-9)
        assert fast_masks.has_two_per_group(f.M)
        assert np.all(xp.to_numpy(f.S)[~xp.to_numpy(f.M)] == 0)


# ------------------------------------------------------------------------------------------------------------
# Dispatch, signature, threads
# ------------------------------------------------------------------------------------------------------------
def test_every_backend_keeps_the_reference_signature():
    reference = list(inspect.signature(ref.factorize).parameters)
    for backend, device in (("numpy", "cpu"), ("reference", "cpu")) + ((("torch", "cpu"),) if HAS_TORCH else ()):
        fn = get_factorize(backend, device)
        params = inspect.signature(fn).parameters
        assert [p for p in params if params[p].kind != inspect.Parameter.KEYWORD_ONLY] == reference, backend
        assert "threads" in params
    W, H = make_layer(32, 64)
    with pytest.raises(ValueError, match="block size"):
        get_factorize("numpy", "cpu")(W, H, block_size=6)
    with pytest.raises(ValueError, match="unknown init"):
        get_factorize("numpy", "cpu")(W, H, init="random")
    with pytest.raises(ValueError, match="unknown schedule"):
        get_factorize("numpy", "cpu")(W, H, schedule="sgd")
    with pytest.raises(ValueError, match="dtype"):
        get_factorize("numpy", "cpu")(W, H, block_size=8, dtype="float16")
    with pytest.raises(ValueError, match="unknown proxy"):
        get_factorize("numpy", "cpu")(W, H, block_size=8, proxy="l1")
    with pytest.raises(ValueError, match="Gram matrix shape"):
        get_factorize("numpy", "cpu")(W, H[:-4, :-4], block_size=8)
    with pytest.raises(ValueError, match="NaN"):
        get_factorize("numpy", "cpu")(np.where(W > 2, np.nan, W), H, block_size=8)
    for budget in ({"sweeps": -1}, {"sweeps": 1.5}, {"tol": -0.1}, {"tol": float("inf")}):
        with pytest.raises(ValueError, match="sweeps|tol"):
            get_factorize("numpy", "cpu")(W, H, block_size=8, **budget)


def test_reference_backend_is_the_reference():
    W, H = make_layer(32, 64, 1)
    got = get_factorize("reference", "cpu")(W, H, proxy="hessian", block_size=8, sweeps=2, threads=1)
    want = ref.factorize(W, H, proxy="hessian", block_size=8, sweeps=2)
    np.testing.assert_array_equal(got.M, want.M)
    np.testing.assert_array_equal(losses(got), losses(want))
    assert BACKENDS == ("numpy", "torch", "cupy", "reference")


def test_unknown_backend_or_device():
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        get_factorize("jax", "cpu")
    for backend in ("numpy", "reference"):
        with pytest.raises(BackendUnavailable, match="CPU only"):
            get_factorize(backend, "cuda")
    if HAS_TORCH:
        with pytest.raises(ValueError, match="unknown device"):
            get_factorize("torch", "tpu")


def test_missing_gpu_gives_a_clear_message():
    if not _cuda():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            get_factorize("torch", "cuda")
    if not _cupy():
        with pytest.raises(BackendUnavailable, match="(?i)cupy|cuda"):
            get_factorize("cupy", "cuda")
    with pytest.raises(BackendUnavailable, match="CUDA only"):
        get_factorize("cupy", "cpu")


def _blas_threads() -> set[int]:
    from threadpoolctl import threadpool_info

    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_limit_threads_sets_and_restores_both_pools():
    before_blas = _blas_threads()
    torch = pytest.importorskip("torch") if HAS_TORCH else None
    before_torch = torch.get_num_threads() if torch else None
    assert current_limit() is None
    with limit_threads(1) as n:
        assert n == 1 and current_limit() == 1
        assert _blas_threads() == {1}
        if torch:
            assert torch.get_num_threads() == 1
    assert current_limit() is None and _blas_threads() == before_blas
    if torch:
        assert torch.get_num_threads() == before_torch
    with pytest.raises(ValueError, match="at least 1"):
        with limit_threads(0):
            pass
    assert 1 <= default_threads()


def test_factorize_runs_under_its_thread_limit(monkeypatch):
    """``threads=N`` applies N for the call; ``None`` inside a ``limit_threads`` block takes the block's count."""
    seen = []
    real_core_step = fast.core_values_step

    def spy(problem, f, *args, **kwargs):
        seen.append(_blas_threads())
        return real_core_step(problem, f, *args, **kwargs)

    monkeypatch.setattr(fast, "core_values_step", spy)
    W, H = make_layer(32, 64)
    get_factorize("numpy", "cpu")(W, H, block_size=8, sweeps=1, threads=1)
    with limit_threads(2):
        get_factorize("numpy", "cpu")(W, H, block_size=8, sweeps=1)
    assert seen == [{1}, {2}]


def test_default_threads_leave_busy_cores_and_other_ranks_alone(monkeypatch):
    import backends.threads as threads

    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.default_threads() == 8
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.default_threads() == 5  # three cores busy
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == 2  # five free cores shared by two torchrun processes
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (11.0, 0.0, 0.0))
    assert threads.default_threads() == 1


def test_commands_take_threads_and_run_under_them(small_model, monkeypatch):
    """``--threads`` on factorize (and the same option on demo, prune and compress): the factorization runs with
    that many BLAS threads; 0 is a usage error."""
    from click.testing import CliRunner

    import backends.threads
    from toolkit.cli import cli

    seen = []
    real_core_step = fast.core_values_step
    monkeypatch.setattr(
        fast, "core_values_step", lambda *a, **k: seen.append(_blas_threads()) or real_core_step(*a, **k)
    )
    monkeypatch.setattr(backends.threads, "default_threads", lambda: 2)  # not what --threads asks for
    args = ["factorize", str(small_model.weights), "--calib", str(small_model.calib), "--block-size", "16"]
    result = CliRunner().invoke(cli, [*args, "--sweeps", "1", "--tensors", "l2.*", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert seen == [{1}]
    bad = CliRunner().invoke(cli, [*args, "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output
    for command in ("demo", "prune", "compress"):
        assert "--threads" in CliRunner().invoke(cli, [command, "--help"]).output


@pytest.mark.parametrize("target", FLOAT64_CPU)
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_an_all_dead_support_decides_as_in_the_reference(target, proxy):
    """The degenerate layer of verification's third thorough run (a support of two dead channels whose ``Q_ss`` is
    rounding residue): the fast path's ``Q_ss⁺`` cut-off is the reference's, so the decisions agree and no core
    value blows up."""
    from verification.test_factorize import ALL_DEAD_SUPPORT

    layer = ALL_DEAD_SUPPORT.build()
    want = ref.factorize(layer.W, layer.gram, proxy, block_size=16, sweeps=3, tol=0.0)
    got = get_factorize(*target)(layer.W, layer.gram, proxy, block_size=16, sweeps=3, tol=0.0)
    assert_same_answers(got, want)
    assert np.all(np.abs(got.S) < np.finfo(np.float32).max)


# ------------------------------------------------------------------------------------------------------------
# The GPU's pseudo-inverse of the A- and B-steps (batched Gram eigendecompositions instead of a per-matrix SVD)
# ------------------------------------------------------------------------------------------------------------
def _thin_batch(rng: np.random.Generator, p: int, q: int, singular_values: list[float]) -> np.ndarray:
    """Matrices (len, p, q) with the given singular values (the rest zero), random singular vectors."""
    k = min(p, q)
    out = []
    for sv in singular_values:
        U = np.linalg.qr(rng.standard_normal((p, k)))[0]
        V = np.linalg.qr(rng.standard_normal((q, k)))[0]
        out.append((U * np.array(sv + [0.0] * (k - len(sv)))) @ V.T)
    return np.stack(out)


@pytest.mark.parametrize("xp", _namespaces(), ids=lambda xp: xp.name)
@pytest.mark.parametrize(("p", "q"), [(8, 300), (400, 16)], ids=["wide", "tall"])
def test_gram_pinv_is_the_svd_pinv_with_its_cut_off(xp, p, q):
    """Same pseudo-inverse as the SVD's, the same directions dropped: σ = 1e-4·σ_max is kept (the cut-off is
    1e-6·σ_max, i.e. 1e-12·λ_max on the Gram matrix), σ = 1e-8·σ_max and exact zeros are not; a zero matrix.
    Agreement to float64 round-off times the squared condition number of the kept directions (the Gram matrix's)."""
    rng = np.random.default_rng(p)
    k = min(p, q)
    spectra = [list(np.linspace(1, 3, k)), [2.0] + [1.0] * (k - 3) + [1e-4, 1e-8], [5.0, 1.0], [0.0]]
    kappa = np.array([3.0, 2e4, 5.0, 1.0])  # σ_max / smallest σ kept
    M = _thin_batch(rng, p, q, spectra)
    want = xp.to_numpy(fast.lstsq_pinv(xp, xp.asarray(M)))
    got = xp.to_numpy(fast.gram_pinv(xp, xp.asarray(M)))
    error = np.abs(got - want).reshape(len(M), -1).max(-1)
    assert np.all(error <= 1e-14 * kappa**2 * np.abs(want).reshape(len(M), -1).max(-1)), error
    ranks = np.linalg.matrix_rank(got, tol=1e-3)
    assert list(ranks) == [k, k - 1, 2, 0]  # the 1e-4 direction kept (it dominates the inverse), 1e-8 dropped


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_the_gpu_pseudo_inverse_makes_the_reference_decisions(monkeypatch, proxy):
    """The fast path with the GPU's pseudo-inverse (forced on NumPy) keeps the equality contract in float64."""
    monkeypatch.setattr(fast, "on_gpu", lambda xp: True)
    layer = (32, 64, 2, (5, 40))
    want = reference_result(layer, proxy=proxy, block_size=8, sweeps=4, seed=7, tol=0.0)
    got = get_factorize("numpy", "cpu")(*make_layer(*layer), proxy=proxy, block_size=8, sweeps=4, seed=7, tol=0.0)
    assert_same_answers(got, want)

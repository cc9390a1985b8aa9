"""Backends (``backends/``): the same answers as the reference, and the §4 guarantee on every backend present.

Parametrised over what this machine has: ``numpy`` always; ``torch`` on the CPU (float64 and float32) when torch
imports; ``torch`` on CUDA and ``cupy`` only with a GPU (skipped cleanly otherwise).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from armor_ref import factorization as F
from armor_ref import masks as ref_masks
from armor_ref.baselines import BASELINES, run_baseline
from armor_ref.masks import has_two_per_group
from armor_ref.objectives import gram_matrix, hessian_loss, make_problem, nowag_loss
from backends import BackendUnavailable, get_factorize

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


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


# (backend, device, dtype name, relative slack allowed on the monotone trace)
BACKEND_CASES = [
    pytest.param(("numpy", "cpu", None, 1e-9), id="numpy"),
    pytest.param(("torch", "cpu", "float64", 1e-9), id="torch-cpu-f64", marks=needs_torch),
    pytest.param(("torch", "cpu", "float32", 1e-5), id="torch-cpu-f32", marks=needs_torch),
    pytest.param(
        ("torch", "cuda", "float32", 1e-5),
        id="torch-cuda-f32",
        marks=pytest.mark.skipif(not _cuda(), reason="no CUDA GPU"),
    ),
    pytest.param(
        ("cupy", "cuda", "float32", 1e-5),
        id="cupy-f32",
        marks=pytest.mark.skipif(not _cupy(), reason="CuPy or a CUDA GPU is missing"),
    ),
]


def make_layer(d_out=64, d_in=128, n=300, seed=0, dead=(), outliers=(3, 17)):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    X = rng.standard_normal((n, d_in))
    X[:, list(outliers)] *= 30
    X[:, list(dead)] = 0
    return W, gram_matrix(X)


def factorize_with(case, *args, **kwargs):
    backend, device, dtype, _ = case
    fn = get_factorize(backend, device)
    if dtype is not None and backend == "torch":
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    elif dtype is not None and backend == "cupy":
        kwargs["dtype"] = dtype
    return fn(*args, **kwargs)


def losses(trace):
    return np.array([e["loss"] for e in trace])


# ------------------------------------------------------------------------------------------------------------
# The guarantee, on every backend
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_guarantee_on_every_backend(case, proxy):
    W, H = make_layer(dead=(5,))
    r = factorize_with(case, W, H, proxy=proxy, block_size=16, sweeps=3)
    slack = case[3]
    trace = losses(r.trace)
    assert np.all(np.diff(trace) <= slack * trace[:-1]), trace  # non-increasing
    assert r.loss <= r.baseline_loss * (1 + slack) and r.loss < 0.9 * r.baseline_loss
    assert isinstance(r.M, np.ndarray) and r.M.dtype == bool and has_two_per_group(r.M)
    assert np.all(r.S[~r.M] == 0)
    assert r.A.shape == (4, 16, 16) and r.B.shape == (8, 16, 16) and r.S.shape == W.shape
    # the recorded loss is the loss of the returned Ŵ, measured by the reference's public functions
    measured = (
        nowag_loss(W, r.W_hat(), np.diag(H))
        if proxy == "nowag"
        else hessian_loss(W, r.W_hat(), make_problem(W, H, "hessian").H)
    )
    assert np.isclose(measured, r.loss, rtol=1e-9 if case[2] in (None, "float64") else 1e-4)
    # the baseline loss is the reference's for the same start
    S0, _ = run_baseline(r.init, W, H)
    start = nowag_loss(W, S0, np.diag(H)) if proxy == "nowag" else hessian_loss(W, S0, make_problem(W, H, "hessian").H)
    assert np.isclose(start, r.baseline_loss, rtol=1e-9 if case[2] in (None, "float64") else 1e-5)


# ------------------------------------------------------------------------------------------------------------
# Same answers: torch float64 on the CPU == the reference
# ------------------------------------------------------------------------------------------------------------
EQ_RTOL = 1e-9


@needs_torch
@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
@pytest.mark.parametrize("dead", [(), (5, 40)])
def test_torch_float64_matches_the_reference(proxy, dead):
    W, H = make_layer(dead=dead, seed=1)
    ref = F.factorize(W, H, proxy=proxy, block_size=16, sweeps=6, seed=3)
    got = get_factorize("torch", "cpu")(W, H, proxy=proxy, block_size=16, sweeps=6, seed=3)
    assert got.sweeps == ref.sweeps and len(got.trace) == len(ref.trace)
    np.testing.assert_array_equal(got.M, ref.M)
    np.testing.assert_allclose(losses(got.trace), losses(ref.trace), rtol=EQ_RTOL)
    # the loss is flat at the optimum, so values agree less tightly than losses: ~1e-9 of max |W| seen
    np.testing.assert_allclose(got.W_hat(), ref.W_hat(), rtol=1e-6, atol=1e-8 * np.abs(W).max())


@needs_torch
@pytest.mark.parametrize("init", BASELINES)
def test_torch_baselines_match_the_reference(init):
    import torch

    from backends.torch.baselines import run_baseline as torch_baseline

    W, H = make_layer(seed=2, dead=(7,))
    S_ref, M_ref = run_baseline(init, W, H)
    S, M = torch_baseline(init, torch.from_numpy(W), torch.from_numpy(H))
    np.testing.assert_array_equal(M.numpy(), M_ref)
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-9, atol=1e-12)


@needs_torch
def test_torch_adam_schedule_matches_the_reference():
    W, H = make_layer(seed=4)
    for proxy in ("nowag", "hessian"):
        ref = F.factorize(W, H, proxy=proxy, block_size=16, sweeps=5, schedule="adam")
        got = get_factorize("torch", "cpu")(W, H, proxy=proxy, block_size=16, sweeps=5, schedule="adam")
        np.testing.assert_array_equal(got.M, ref.M)
        # Adam divides by √(second moment) of tiny gradients, which amplifies round-off: 1e-7, not 1e-9
        np.testing.assert_allclose(losses(got.trace), losses(ref.trace), rtol=1e-7)


@needs_torch
def test_torch_masks_pack_like_the_reference():
    import torch

    from backends.torch import masks as tm

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((8, 16))
    scores[0, :4] = 1.0  # ties go to the lower column
    M = tm.select_2of4(torch.from_numpy(scores))
    np.testing.assert_array_equal(M.numpy(), ref_masks.select_2of4(scores))
    core = rng.standard_normal((8, 16)) * M.numpy()
    values, index = tm.pack_2of4(torch.from_numpy(core), M)
    ref_values, ref_index = ref_masks.pack_2of4(core, M.numpy())
    np.testing.assert_array_equal(values.numpy(), ref_values)
    np.testing.assert_array_equal(index.numpy(), ref_index)
    back, mask = tm.unpack_2of4(values, index)
    np.testing.assert_array_equal(back.numpy(), core)
    np.testing.assert_array_equal(mask.numpy(), M.numpy())
    assert tm.is_2of4(back) and tm.has_two_per_group(mask)
    with pytest.raises(ValueError):
        tm.unpack_2of4(values, torch.full_like(index, 0b0101))  # p0 == p1


@needs_torch
def test_torch_float32_is_close_to_the_reference():
    """float32 does not promise the reference's masks bit for bit; it stays close in loss."""
    import torch

    W, H = make_layer(seed=5)
    for proxy in ("nowag", "hessian"):
        ref = F.factorize(W, H, proxy=proxy, block_size=16, sweeps=4)
        got = get_factorize("torch", "cpu")(W, H, proxy=proxy, block_size=16, sweeps=4, dtype=torch.float32)
        assert abs(got.loss - ref.loss) <= 0.05 * ref.loss
        assert np.mean(got.M == ref.M) > 0.9


# ------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------
def test_numpy_backend_is_the_reference():
    assert get_factorize("numpy", "cpu") is F.factorize
    with pytest.raises(BackendUnavailable, match="CPU only"):
        get_factorize("numpy", "cuda")


def test_unknown_backend_or_device():
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        get_factorize("jax", "cpu")
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


@needs_torch
def test_torch_factorize_keeps_the_reference_signature():
    import inspect

    ref = inspect.signature(F.factorize).parameters
    got = inspect.signature(get_factorize("torch", "cpu")).parameters
    assert list(ref) == [p for p in got if p not in ("device", "dtype", "num_threads")]
    W, H = make_layer(d_out=32, d_in=64)
    with pytest.raises(ValueError, match="block size"):
        get_factorize("torch", "cpu")(W, H, block_size=6)
    with pytest.raises(ValueError, match="unknown init"):
        get_factorize("torch", "cpu")(W, H, init="random")

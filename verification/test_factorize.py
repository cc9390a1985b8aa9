"""The guarantee on whole runs of ``factorize``: 2:4 cores, ``Ŵ = reconstruct(A, S, B)``, a non-increasing loss
trace step by step, and ``L(ARMOR) ≤ L(baseline)`` (nowag: ``≤ NoWag-P ≤`` every 2:4 baseline)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from armor_ref.baselines import BASELINES, run_baseline
from armor_ref.factorization import factorize, reconstruct
from armor_ref.objectives import damped, hessian_loss, nowag_loss
from verification.checkers import NOISE_FLOOR, check_result, check_trace_monotone, not_increased
from verification.profiles import scaled
from verification.strategies import Layer, LayerSpec, layer_specs, proxies

#: whole runs are the expensive part: moderate sizes, a couple of sweeps
run_specs = layer_specs(max_dim=64, block_sizes=(4, 8, 16, 32))
SWEEPS = 2


def proxy_loss_of(layer: Layer, proxy: str) -> Callable[[np.ndarray], float]:
    """The proxy loss of a layer-space ``Ŵ``, from :mod:`armor_ref.objectives` directly."""
    if proxy == "nowag":
        return lambda W_hat: nowag_loss(layer.W, W_hat, layer.h)
    H = damped(layer.gram)
    return lambda W_hat: hessian_loss(layer.W, W_hat, H)


@given(spec=run_specs, proxy=proxies, init=st.sampled_from([None, *BASELINES]), seed=st.integers(0, 3))
def test_factorize_structure_trace_and_guarantee(spec: LayerSpec, proxy: str, init: str | None, seed: int) -> None:
    """Every core is 2:4 on its mask, ``Ŵ = reconstruct(A, S, B)``, the trace has one entry per step and never
    rises, the reported losses are the true proxy losses, and ARMOR ends at or below its starting baseline."""
    layer = spec.build()
    loss = proxy_loss_of(layer, proxy)
    result = factorize(
        layer.W, layer.gram, proxy, init=init, block_size=layer.block_size, sweeps=SWEEPS, tol=0.0, seed=seed
    )
    assert check_result(result, loss) == []
    S0, _ = run_baseline(result.init, layer.W, layer.gram)
    floor = NOISE_FLOOR * loss(np.zeros_like(layer.W))
    assert np.isclose(result.baseline_loss, loss(S0), rtol=1e-9, atol=1e6 * floor)
    assert not_increased(loss(S0), loss(result.W_hat()), atol=floor)


#: well-conditioned layers: plain Gaussian weights and calibration, at least 2 row and 2 column blocks (so no exact
#: fit: the loss stays far above rounding noise, ≥ 3 % of the start in 300 trial runs)
well_conditioned_specs = layer_specs(max_dim=48, block_sizes=(4, 8, 16), hard=False, min_blocks=2)


@scaled(0.5)
@given(spec=well_conditioned_specs, proxy=proxies, seed=st.integers(0, 3))
def test_no_step_raises_the_loss_on_well_conditioned_layers(spec: LayerSpec, proxy: str, seed: int) -> None:
    """Theorem 1 with no rounding allowance: on a well-conditioned layer, every step of the trace (the reference
    undoes nothing) is ≤ the previous loss up to ``1e-12`` of it, without the absolute floor of the hard cases.
    A step that had to be undone would be a failure here."""
    layer = spec.build()
    result = factorize(layer.W, layer.gram, proxy, block_size=layer.block_size, sweeps=3, tol=0.0, seed=seed)
    assert check_trace_monotone(result.trace, rtol=1e-12, atol=0.0) == []
    assert result.loss > 1e-3 * result.baseline_loss  # the regime this test is about: far from an exact fit


@given(spec=run_specs)
def test_nowag_chain_armor_below_nowag_p_below_all_baselines(spec: LayerSpec) -> None:
    """nowag: ``L(ARMOR) ≤ L(NoWag-P) ≤ min(magnitude, Wanda, SparseGPT)``."""
    layer = spec.build()
    loss = proxy_loss_of(layer, "nowag")
    armor = loss(factorize(layer.W, layer.gram, "nowag", block_size=layer.block_size, sweeps=SWEEPS).W_hat())
    baselines = {name: loss(run_baseline(name, layer.W, layer.gram)[0]) for name in BASELINES}
    nowag_p = baselines.pop("nowag-p")
    floor = NOISE_FLOOR * loss(np.zeros_like(layer.W))
    assert not_increased(nowag_p, armor, atol=floor)
    for name, value in baselines.items():
        assert not_increased(value, nowag_p, 1e-12, floor), name


@given(spec=run_specs, init=st.sampled_from([None, *BASELINES]))
def test_hessian_armor_below_its_starting_baseline(spec: LayerSpec, init: str | None) -> None:
    """hessian: ``L(ARMOR) ≤ L(start)`` for the default start (SparseGPT) and any baseline given as ``init``."""
    layer = spec.build()
    loss = proxy_loss_of(layer, "hessian")
    result = factorize(layer.W, layer.gram, "hessian", init=init, block_size=layer.block_size, sweeps=SWEEPS)
    assert result.init == (init or "sparsegpt")
    floor = NOISE_FLOOR * loss(np.zeros_like(layer.W))
    assert not_increased(loss(run_baseline(result.init, layer.W, layer.gram)[0]), loss(result.W_hat()), atol=floor)


@scaled(0.5)
@given(spec=layer_specs(max_dim=32, block_sizes=(4, 8, 16)), proxy=proxies)
def test_adam_schedule_returns_best_iterate(spec: LayerSpec, proxy: str) -> None:
    """The paper's Adam schedule is not monotone, but it returns its best iterate, so it never ends above the
    baseline either, and its core is 2:4."""
    layer = spec.build()
    result = factorize(layer.W, layer.gram, proxy, block_size=layer.block_size, sweeps=8, schedule="adam")
    assert check_result(result, proxy_loss_of(layer, proxy)) == []
    assert result.loss <= min(entry["loss"] for entry in result.trace) * (1 + 1e-12) + 1e-300


@scaled(0.5)
@given(spec=layer_specs(max_dim=32, block_sizes=(4, 8, 16)), proxy=proxies)
def test_exported_file_rebuilds_w_hat(spec: LayerSpec, proxy: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``save_armor`` then ``load_armor`` rebuilds ``Ŵ``: exactly the float32-rounded factors' product, and the
    in-memory ``Ŵ`` up to float32 rounding."""
    from toolkit.armor_format import load_armor, save_armor

    layer = spec.build()
    result = factorize(layer.W, layer.gram, proxy, block_size=layer.block_size, sweeps=1)
    path = tmp_path_factory.mktemp("armor") / "layer.safetensors"
    save_armor(path, {"layer.weight": result}, {"layer.bias": np.zeros(spec.d_out, dtype=np.float32)})
    rebuilt = load_armor(path).reconstruct("layer.weight")
    f32 = [x.astype(np.float32).astype(np.float64) for x in (result.A, result.S, result.B)]
    assert np.array_equal(rebuilt, reconstruct(*f32))
    bound = reconstruct(np.abs(result.A), np.abs(result.S), np.abs(result.B))  # |A| |S| |B|, entrywise
    # float32 rounding of each factor, plus underflow: a value like 1e-64 (a zero row's rounding residue)
    # becomes 0 in float32, an absolute error far below 1e-30 of the layer's scale
    atol = 1e-30 * float(bound.max()) + 1e-300
    assert np.all(np.abs(rebuilt - result.W_hat()) <= 4 * np.finfo(np.float32).eps * bound + atol)


#: found by the thorough profile (this version; the decisions are those of edd492d, so that code does the same):
#: a group whose support keeps two dead channels has Q_ss = [[2.8e-88, 0], [0, 0]] — rounding residue of B — and
#: the relative cut-off 1e-12 · λ_max of psd_pinv keeps that eigenvalue, so the discrete step writes a value of
#: 3e43 where the loss cannot see it (Ŵ changes only in dead columns). float32 export turns it into Inf.
ALL_DEAD_SUPPORT = LayerSpec(
    seed=513,
    d_out=32,
    d_in=32,
    block_size=16,
    n_calib=30,
    student_t_dof=2.0,
    n_dead=8,
    n_loud=1,
    loud_scale=10.0,
    n_dup_weights=2,
    correlated=True,
)


@pytest.mark.xfail(
    strict=True,
    reason="finding: psd_pinv's cut-off is relative to the 2×2 block itself, so an all-dead support's rounding "
    "residue (eigenvalue 3e-88) is inverted and a core value of 3e43 is written; see PROOF.md, Tolerances",
)
def test_core_values_fit_in_float32_on_an_all_dead_support() -> None:
    layer = ALL_DEAD_SUPPORT.build()
    result = factorize(layer.W, layer.gram, "nowag", block_size=16, sweeps=1)
    assert np.all(np.abs(result.S) < np.finfo(np.float32).max)

"""The fused discrete walk (backends/torch/discrete_kernel.py) against the loop it replaces and the reference.

Not collected by the suite (the name does not start with ``test_``): ``test_discrete_kernel.py`` runs this file in
a fresh interpreter, on CPU tensors with ``TRITON_INTERPRET=1`` set before triton is imported and
``ARMOR_FUSED_WALK=1`` (the kernel forced on the CPU), and on CUDA tensors with triton compiling where a GPU is
visible (``ARMOR_TEST_DEVICE=cuda``). By hand::

    TRITON_INTERPRET=1 ARMOR_FUSED_WALK=1 PYTHONPATH=$PWD python -m pytest -q tests/fused_walk_cases.py

1. The kernel against :func:`backends.factorization.walk_column_block` on the same inputs (the loop is main's own
   function, not a copy): identical masks and support-change counts, values to 1e-12, ``L`` to 1e-10, one launch
   per call — on random layers and on hard ones (dead input channels: singular ``Q_ss`` and groups whose 6 supports
   cost exactly the same; zero columns of ``A``: groups with ``a = 0``; positions visited twice).
2. The whole fast-path ``factorize`` with the kernel doing every walk, against :func:`armor_ref.factorization.
   factorize` itself: the equality contract of test_backends.py (same masks, every loss to 1e-9, no revert).
3. float32: the guarantee (trace non-increasing to round-off, ≤ the SparseGPT start) and masks close to float64's.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_backends import assert_same_answers, losses, make_layer, reference_result

from armor_ref.masks import select_2of4
from backends import factorization as fast
from backends import get_factorize
from backends.torch import discrete_kernel as dk
from backends.xp import make_namespace

DEVICE = os.environ.get("ARMOR_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.skipif(
    not dk.available() or (DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="needs triton (and CUDA for ARMOR_TEST_DEVICE=cuda)",
)
DEAD_CHANNELS = (0, 1, 2, 3, 5, 6, 7)  # all of group 0 and three of group 1: exactly tied supports
ZERO_A_COLUMNS = ((0, 3), (1, 5))  # (row block, column of A_r): groups with a = 0


def walk_inputs(proxy: str, R: int, K: int, b: int, seed: int, hard: bool, dtype: str = "float64") -> dict:
    """What :func:`backends.factorization.discrete_step` hands the walk, at a state part way through a
    factorization (``A``, ``B`` near the identity, the magnitude 2:4 core), on ``DEVICE``: for every column block
    (hessian) or all at once (nowag), ``S``/``M`` views, ``L = Aᵀ G Bᵀ``, ``AtA``, ``a_norm2`` and the tables.
    ``hard``: dead input channels (an undamped singular ``H``), ``B = I`` on the first column block (so they stay
    dead there) and zero columns of ``A``."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((R * b, K * b))
    X = rng.standard_normal((4 * K * b, K * b)) * rng.uniform(0.3, 3.0, K * b)
    if hard:
        X[:, list(DEAD_CHANNELS)] = 0
    H = X.T @ X if proxy == "hessian" else np.diag((X * X).sum(0))
    A = np.eye(b) + 0.2 * rng.standard_normal((R, b, b))
    B = np.eye(b) + 0.2 * rng.standard_normal((K, b, b))
    if hard:
        B[0] = np.eye(b)
        for r, column in ZERO_A_COLUMNS:
            A[r, :, column] = 0
    M = select_2of4(np.abs(W))
    xp = make_namespace("torch", DEVICE, dtype)
    A, B, W, H, S, M = (xp.asarray(a) for a in (A, B, W, H, W * M, M))
    At, Bt = fast.transpose_blocks(xp, A), fast.transpose_blocks(xp, B)
    G = (W - fast.reconstruct(xp, A, S, B)) @ H
    H_kk = xp.stack([H[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])
    return {
        "xp": xp,
        "S": S.reshape(R, b, K, b // 4, 4),
        "M": M.reshape(R, b, K, b // 4, 4),
        "L": fast.blockdiag_right(xp, fast.blockdiag_left(At, G), Bt).reshape(R, b, K * b),
        "AtA": At @ A,
        "a_norm2": (A * A).sum(1),
        "tables": fast.group_tables(xp, B, H_kk),
    }


def positions(b: int, n: int, seed: int, must: tuple[int, ...] = ()) -> list[int]:
    """``n`` distinct positions in random order, ``must`` among them, then the first 3 again (a revisit)."""
    rng = np.random.default_rng(seed)
    rest = [int(x) for x in rng.permutation(b * b // 4) if x not in must]
    chosen = [int(x) for x in rng.permutation(list(must) + rest[: max(0, n - len(must))])]
    return chosen + chosen[:3]


def walk_both(state: dict, ks: slice, where: list[int], tie: float | None = None) -> tuple[dict, dict]:
    """The loop and the kernel on copies of the same batch ``ks`` (``tie``: default the working dtype's); each
    side's changes, S, M and L."""
    xp, b = state["xp"], state["S"].shape[1]
    if tie is None:
        tie = fast.TIE_TOLERANCE[str(state["S"].dtype).removeprefix("torch.")]
    cols = slice(ks.start * b, ks.stop * b)
    out = []
    for walk in (fast.walk_column_block, dk.walk_column_block_fused):
        S, M = state["S"].clone(), state["M"].clone()
        L = state["L"][:, :, cols].clone()
        launches = dk.LAUNCHES["walk_column_block"]
        changed = walk(xp, S[:, :, ks], M[:, :, ks], L, state["AtA"], state["a_norm2"], state["tables"].select(ks),
                       tie, where)  # fmt: skip
        fused = walk is dk.walk_column_block_fused
        assert dk.LAUNCHES["walk_column_block"] - launches == int(fused)  # one launch per call, none for the loop
        out.append({"changed": int(changed), "S": S, "M": M, "L": L})
    return out[0], out[1]


def assert_same_walk(loop: dict, fused: dict, state: dict) -> None:
    assert fused["changed"] == loop["changed"] > 0  # some supports changed: the comparison is not vacuous
    assert torch.equal(fused["M"], loop["M"])
    assert torch.max(torch.abs(fused["S"] - loop["S"])) <= 1e-12 * torch.max(torch.abs(loop["S"]))
    assert torch.max(torch.abs(fused["L"] - loop["L"])) <= 1e-10 * torch.max(torch.abs(loop["L"]))
    assert not torch.equal(loop["S"], state["S"])


@pytest.mark.parametrize("b", [8, 16, 32])
def test_fused_equals_the_loop_on_a_hessian_column_block(b):
    state = walk_inputs("hessian", R=2, K=2, b=b, seed=b, hard=False)
    assert_same_walk(*walk_both(state, slice(1, 2), positions(b, 20, seed=b)), state)


def test_fused_applies_the_tie_tolerance_as_the_loop_does():
    """A loose tolerance (0.1) keeps supports the default one would switch: the kernel keeps the same ones."""
    state = walk_inputs("hessian", R=2, K=1, b=8, seed=3, hard=False)
    where = positions(8, 16, seed=3)
    strict, _ = walk_both(state, slice(0, 1), where)
    loop, fused = walk_both(state, slice(0, 1), where, tie=0.1)
    assert loop["changed"] < strict["changed"]  # the tolerance matters on this block
    assert_same_walk(loop, fused, state)


def test_fused_equals_the_loop_on_a_nowag_batch_of_column_blocks():
    """nowag walks every column block at once: grid (row blocks, column blocks)."""
    state = walk_inputs("nowag", R=2, K=3, b=8, seed=18, hard=False)
    assert_same_walk(*walk_both(state, slice(0, 3), positions(8, 12, seed=8)), state)


@pytest.mark.parametrize("proxy", ["hessian", "nowag"])
@pytest.mark.parametrize("b", [8, 16])
def test_fused_equals_the_loop_on_hard_blocks(proxy, b):
    """Dead channels (singular ``Q_ss``, a group whose 6 supports all cost exactly 0, exactly tied pairs) and
    ``a = 0``, every such position visited."""
    nb = b // 4
    state = walk_inputs(proxy, R=2, K=2, b=b, seed=b, hard=True)
    dead_groups = sorted({c // 4 for c in DEAD_CHANNELS})
    must = tuple(p * nb + g for p in sorted({p for _, p in ZERO_A_COLUMNS} | {0, 1, 2}) for g in dead_groups)
    # the data has what the test is about: a = 0, Q = 0 (all supports tie), some singular Q_ss
    assert all(state["a_norm2"][r, p] == 0 for r, p in ZERO_A_COLUMNS)
    assert torch.all(state["tables"].Q[0, 0] == 0)
    Q1 = state["tables"].Q[0, 1]
    assert torch.linalg.matrix_rank(Q1) == 1
    assert_same_walk(*walk_both(state, slice(0, 1 if proxy == "hessian" else 2), positions(b, 16, b, must)), state)


def test_fused_walk_at_block_64():
    state = walk_inputs("hessian", R=1, K=1, b=64, seed=64, hard=False)
    assert_same_walk(*walk_both(state, slice(0, 1), positions(64, 12, seed=64)), state)


# --------------------------------------------------------------------------------------------------------------
# The whole fast path with the kernel doing every walk
# --------------------------------------------------------------------------------------------------------------
FACTORIZE_CASES = [
    # (d_out, d_in, seed, dead), block size, sweeps, proxy
    pytest.param((32, 64, 2, (5, 40)), 8, 3, "hessian", id="32x64-b8-dead-hessian"),
    pytest.param((16, 32, 2, (5,)), 8, 2, "nowag", id="16x32-b8-dead-nowag"),
    pytest.param((32, 64, 1, ()), 16, 2, "hessian", id="32x64-b16-hessian"),
]


@pytest.mark.parametrize(("layer", "block_size", "sweeps", "proxy"), FACTORIZE_CASES)
def test_factorize_with_the_fused_walk_makes_the_reference_decisions(layer, block_size, sweeps, proxy):
    options = dict(proxy=proxy, block_size=block_size, sweeps=sweeps, seed=7, tol=0.0)
    want = reference_result(layer, **options)
    launches = dk.LAUNCHES["walk_column_block"]
    got = get_factorize("torch", DEVICE)(*make_layer(*layer), dtype="float64", **options)
    launched = dk.LAUNCHES["walk_column_block"] - launches
    K = layer[1] // block_size
    # the kernel did the walks: at most one launch per column block (hessian) or per step (nowag), per sweep
    assert 0 < launched <= sweeps * (K if proxy == "hessian" else 1)
    assert_same_answers(got, want)


@pytest.mark.parametrize(("proxy", "layer"), [("hessian", (32, 64, 5, (9,))), ("nowag", (16, 32, 5, (9,)))])
def test_float32_fused_walk_keeps_the_guarantee(proxy, layer):
    options = dict(proxy=proxy, block_size=8, sweeps=2)
    want = reference_result(layer, **options)
    launches = dk.LAUNCHES["walk_column_block"]
    got = get_factorize("torch", DEVICE)(*make_layer(*layer), dtype="float32", **options)
    assert dk.LAUNCHES["walk_column_block"] > launches
    trace = losses(got)
    assert np.all(np.diff(trace) <= 1e-5 * trace[:-1]), trace
    assert got.loss <= got.baseline_loss * (1 + 1e-5) and got.loss < 0.9 * got.baseline_loss
    assert abs(got.loss - want.loss) <= 0.02 * want.loss
    assert np.mean(got.M == want.M) > 0.95  # masks differ only where a gain is below float32 resolution

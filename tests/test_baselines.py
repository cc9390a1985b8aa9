import itertools

import numpy as np
import pytest

from armor_ref.baselines import BASELINES, prune_nowag_p, prune_sparsegpt, prune_wanda, run_baseline
from armor_ref.masks import has_two_per_group
from armor_ref.objectives import gram_matrix, hessian_loss, nowag_loss


@pytest.fixture
def layer():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((16, 32))
    X = rng.standard_normal((200, 32)) * rng.uniform(0.2, 5, size=32)
    return W, gram_matrix(X)


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_is_2of4_and_keeps_only_masked_entries(layer, name):
    W, H = layer
    S, M = run_baseline(name, W, H)
    assert has_two_per_group(M) and np.all(S[~M] == 0)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "nowag-p"])
def test_mask_only_baselines_keep_values(layer, name):
    W, H = layer
    S, M = run_baseline(name, W, H)
    np.testing.assert_array_equal(S[M], W[M])


def test_nowag_p_is_optimal_over_all_masks_of_a_small_matrix():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((2, 8))
    h = rng.uniform(0.1, 3, 8)
    S, _ = prune_nowag_p(W, h)
    best = np.inf
    supports = list(itertools.combinations(range(4), 2))
    for choice in itertools.product(supports, repeat=4):
        M = np.zeros((2, 8), dtype=bool)
        for n, (p0, p1) in enumerate(choice):
            i, g = divmod(n, 2)
            M[i, 4 * g + p0] = M[i, 4 * g + p1] = True
        best = min(best, nowag_loss(W, W * M, h))
    assert np.isclose(nowag_loss(W, S, h), best)


def test_nowag_p_beats_every_other_baseline_on_the_nowag_loss(layer):
    W, H = layer
    h = np.diag(H)
    ref = nowag_loss(W, prune_nowag_p(W, h)[0], h)
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert ref <= nowag_loss(W, run_baseline(name, W, H)[0], h) + 1e-12


def test_sparsegpt_beats_wanda_on_output_error(layer):
    W, H = layer
    assert hessian_loss(W, prune_sparsegpt(W, H)[0], H) < hessian_loss(W, prune_wanda(W, np.diag(H))[0], H)


def test_sparsegpt_lazy_batching_does_not_change_the_result(layer):
    W, H = layer
    S_small, M_small = prune_sparsegpt(W, H, block_size=4)
    S_big, M_big = prune_sparsegpt(W, H, block_size=128)
    np.testing.assert_array_equal(M_small, M_big)
    np.testing.assert_allclose(S_small, S_big, atol=1e-10)


def test_sparsegpt_handles_dead_inputs():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((8, 16))
    X = rng.standard_normal((40, 16))
    X[:, 5] = 0
    S, M = prune_sparsegpt(W, gram_matrix(X))
    assert np.all(np.isfinite(S)) and has_two_per_group(M) and S[:, 5].tolist() == [0.0] * 8

import numpy as np

from armor_ref.objectives import (
    damped,
    gram_matrix,
    hessian_loss,
    make_problem,
    nowag_loss,
    nowag_normalization,
    relative_output_error,
)


def test_nowag_normalization_gives_unit_rows_after_unit_columns():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((12, 20)) * rng.uniform(0.1, 10, size=20)
    W_bar, r, c = nowag_normalization(W)
    np.testing.assert_allclose(np.linalg.norm(W_bar, axis=1), 1.0)
    np.testing.assert_allclose(r[:, None] * W_bar * c[None, :], W)


def test_nowag_normalization_survives_zero_columns():
    W = np.ones((4, 8))
    W[:, 3] = 0
    W_bar, _, c = nowag_normalization(W)
    assert np.all(np.isfinite(W_bar)) and c[3] == 1.0


def test_hessian_loss_is_the_output_error_on_the_calibration_data():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((50, 16))
    W, W_hat = rng.standard_normal((8, 16)), rng.standard_normal((8, 16))
    H = gram_matrix(X)
    assert np.isclose(hessian_loss(W, W_hat, H), np.linalg.norm((W - W_hat) @ X.T) ** 2)
    assert np.isclose(
        relative_output_error(W, W_hat, H),
        np.linalg.norm((W - W_hat) @ X.T) ** 2 / np.linalg.norm(W @ X.T) ** 2,
    )


def test_nowag_loss_matches_its_definition():
    rng = np.random.default_rng(3)
    W, W_hat = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    h = rng.uniform(0, 2, 8)
    W_bar, r, c = nowag_normalization(W)
    expected = sum(h[j] * (W_bar[i, j] - W_hat[i, j] / r[i] / c[j]) ** 2 for i in range(6) for j in range(8))
    assert np.isclose(nowag_loss(W, W_hat, h), expected)


def test_damping_adds_a_multiple_of_the_mean_diagonal():
    H = np.diag([1.0, 3.0])
    np.testing.assert_allclose(damped(H, 0.5), np.diag([2.0, 4.0]))
    np.testing.assert_allclose(damped(np.zeros((2, 2)), 0.1), 0.1 * np.eye(2))


def test_problem_losses_equal_the_proxies():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 8))
    W, W_hat = rng.standard_normal((4, 8)), rng.standard_normal((4, 8))
    H = gram_matrix(X)
    p = make_problem(W, H, "nowag")
    assert np.isclose(p.loss(p.to_target_space(W_hat)), nowag_loss(W, W_hat, np.diag(H)))
    np.testing.assert_allclose(p.to_layer(p.to_target_space(W_hat)), W_hat)
    q = make_problem(W, H, "hessian", damping=0.01)
    assert np.isclose(q.loss(W_hat), hessian_loss(W, W_hat, damped(H, 0.01)))


def test_relative_output_error_is_nan_when_undefined():
    """0/0 (a zero layer, or no calibration signal) and a non-finite denominator give NaN, never 0.0."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((20, 8))
    W_hat = rng.standard_normal((4, 8))
    assert np.isnan(relative_output_error(np.zeros((4, 8)), W_hat, gram_matrix(X)))
    assert np.isnan(relative_output_error(rng.standard_normal((4, 8)), W_hat, np.zeros((8, 8))))
    H = gram_matrix(X)
    H[0, 0] = np.inf
    assert np.isnan(relative_output_error(rng.standard_normal((4, 8)), W_hat, H))
    assert np.isfinite(relative_output_error(rng.standard_normal((4, 8)), W_hat, gram_matrix(X)))

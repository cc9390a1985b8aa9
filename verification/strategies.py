"""Hypothesis strategies for *hard* layers.

A layer is described by a :class:`LayerSpec`: a seed plus a handful of structural choices (shape, block size,
number of calibration rows, dead / loud / duplicated input channels, heavy-tailed weights, fp16 rounding).
Hypothesis draws and shrinks the spec; :meth:`LayerSpec.build` turns it into arrays deterministically with
NumPy. A failing example therefore prints as a short ``LayerSpec(...)`` that rebuilds the same arrays anywhere:

    >>> from verification.strategies import LayerSpec
    >>> layer = LayerSpec(seed=0, d_out=8, d_in=16, block_size=8).build()

The hard features, each switched on by the drawn spec:

* ``d_out != d_in`` and block sizes 4–64 (a multiple of 4 dividing both dimensions);
* fewer calibration rows than ``d_in``: the Gram matrix ``H = XᵀX`` is rank-deficient;
* dead input channels: zero activation columns, so ``h_j = 0``;
* loud input channels: a few activation columns scaled 10–100×;
* heavy-tailed weights: Student-t with 1–5 degrees of freedom;
* duplicated input channels (identical activation columns) and duplicated weight columns;
* correlated activations (a random mixing of channels), which makes the hessian proxy couple columns;
* zero weight rows; fp16-rounded weights and activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from armor_ref.objectives import gram_matrix

BLOCK_SIZES = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Layer:
    """A generated layer: weights ``W`` (d_out, d_in), activations ``X`` (N, d_in), ``gram = XᵀX``."""

    spec: LayerSpec
    W: np.ndarray
    X: np.ndarray
    gram: np.ndarray

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def h(self) -> np.ndarray:
        return np.diag(self.gram).copy()


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to rebuild a layer; the defaults give a plain Gaussian layer."""

    seed: int
    d_out: int
    d_in: int
    block_size: int
    n_calib: int = 0  # calibration rows; 0 means 2 · d_in
    student_t_dof: float | None = None  # heavy-tailed weights when set
    n_dead: int = 0  # zero activation columns (h_j = 0)
    n_loud: int = 0  # activation columns scaled by loud_scale
    loud_scale: float = 30.0
    n_dup_inputs: int = 0  # activation columns copied from others
    n_dup_weights: int = 0  # weight columns copied from others
    n_zero_rows: int = 0  # all-zero weight rows
    correlated: bool = False  # mix the activation channels
    fp16: bool = False  # round W and X to float16

    def build(self) -> Layer:
        rng = np.random.default_rng(self.seed)
        d_out, d_in = self.d_out, self.d_in
        if self.student_t_dof is None:
            W = rng.standard_normal((d_out, d_in))
        else:
            W = rng.standard_t(self.student_t_dof, size=(d_out, d_in))
        N = self.n_calib if self.n_calib > 0 else 2 * d_in
        X = rng.standard_normal((N, d_in))
        if self.correlated:
            X = X @ (np.eye(d_in) + rng.standard_normal((d_in, d_in)) / np.sqrt(d_in))
        channels = rng.permutation(d_in)  # disjoint sets of special channels, in a drawn order
        taken = 0

        def pick(n: int) -> np.ndarray:
            nonlocal taken
            n = max(0, min(n, d_in - taken - 1))  # always leave one ordinary channel
            out = channels[taken : taken + n]
            taken += n
            return out

        for j in pick(self.n_dup_inputs):
            X[:, j] = X[:, rng.integers(d_in)]
        for j in pick(self.n_dup_weights):
            W[:, j] = W[:, rng.integers(d_in)]
        X[:, pick(self.n_loud)] *= self.loud_scale
        X[:, pick(self.n_dead)] = 0.0
        W[rng.permutation(d_out)[: min(self.n_zero_rows, d_out - 1)], :] = 0.0
        if self.fp16:
            W = W.astype(np.float16).astype(np.float64)
            X = X.astype(np.float16).astype(np.float64)
        # an fp16 overflow or a Cauchy draw can give inf; keep the layer finite
        W = np.nan_to_num(W, nan=0.0, posinf=6e4, neginf=-6e4)
        X = np.nan_to_num(X, nan=0.0, posinf=6e4, neginf=-6e4)
        return Layer(self, W, X, gram_matrix(X))


@st.composite
def layer_specs(
    draw: st.DrawFn,
    max_dim: int = 64,
    block_sizes: tuple[int, ...] = BLOCK_SIZES,
    max_blocks: int = 4,
    hard: bool = True,
    min_blocks: int = 1,
) -> LayerSpec:
    """Draw a :class:`LayerSpec` with both dimensions ``≤ max_dim`` and a block size from ``block_sizes``.

    The block size ``b`` comes first; the dimensions are ``b`` times a drawn number of blocks (``min_blocks`` to
    ``max_blocks``), so ``b`` always divides both and ``d_out != d_in`` happens often. With ``hard=False`` only the
    shape is drawn: a plain Gaussian layer with twice as many calibration rows as inputs.
    """
    usable = [b for b in block_sizes if min_blocks * b <= max_dim]
    b = draw(st.sampled_from(usable))
    most = max(min_blocks, min(max_blocks, max_dim // b))
    d_out = b * draw(st.integers(min_blocks, most))
    d_in = b * draw(st.integers(min_blocks, most))
    seed = draw(st.integers(0, 2**32 - 1))
    if not hard:
        return LayerSpec(seed=seed, d_out=d_out, d_in=d_in, block_size=b)
    calib = draw(st.sampled_from(["plenty", "few"]))
    n_calib = 2 * d_in if calib == "plenty" else draw(st.integers(1, max(1, d_in - 1)))
    quarter = max(1, d_in // 4)
    return LayerSpec(
        seed=seed,
        d_out=d_out,
        d_in=d_in,
        block_size=b,
        n_calib=n_calib,
        student_t_dof=draw(st.sampled_from([None, 1.0, 2.0, 3.0, 5.0])),
        n_dead=draw(st.integers(0, quarter)),
        n_loud=draw(st.integers(0, min(4, quarter))),
        loud_scale=draw(st.sampled_from([10.0, 30.0, 100.0])),
        n_dup_inputs=draw(st.integers(0, quarter)),
        n_dup_weights=draw(st.integers(0, min(2, quarter))),
        n_zero_rows=draw(st.integers(0, 1)),
        correlated=draw(st.booleans()),
        fp16=draw(st.booleans()),
    )


def layers(**kwargs: object) -> st.SearchStrategy[Layer]:
    """Built layers; ``kwargs`` go to :func:`layer_specs`."""
    return layer_specs(**kwargs).map(LayerSpec.build)  # type: ignore[arg-type]


proxies: st.SearchStrategy[str] = st.sampled_from(["nowag", "hessian"])


# ----------------------------------------------------------------------------------------------------------
# Two input streams (AA-SVD, the anchored objectives): the original model's X beside the compressed model's X'
# ----------------------------------------------------------------------------------------------------------
#: sizes of the shift X' − X, relative to the activations' own scale: none, rounding-like, realistic, as large
SHIFT_SIZES = (0.0, 1e-3, 1e-1, 1.0)


@dataclass(frozen=True)
class TwoStreamLayer:
    """A layer seen through two input streams on the same tokens: ``X`` (original model) and ``X'`` (the
    partially compressed model), with ``G = XᵀX``, ``G' = X'ᵀX'`` and the cross Gram ``C = XᵀX'``."""

    spec: TwoStreamSpec
    W: np.ndarray  # (d_out, d_in)
    X: np.ndarray  # (N, d_in)
    X_shift: np.ndarray  # (N, d_in)

    @property
    def G(self) -> np.ndarray:
        return gram_matrix(self.X)

    @property
    def G_shift(self) -> np.ndarray:
        return gram_matrix(self.X_shift)

    @property
    def C(self) -> np.ndarray:
        return self.X.T @ self.X_shift


@dataclass(frozen=True)
class TwoStreamSpec:
    """A :class:`LayerSpec` (``W`` and ``X``, with all its hard features) plus the shift ``X' = X + drift · X Δ +
    noise · rms(X) · Z``: ``Δ`` a random (d_in, d_in) mixing scaled by ``1/√d_in`` (upstream error is correlated
    with the inputs), ``Z`` standard normal noise. ``drift = noise = 0`` gives ``X' = X``."""

    layer: LayerSpec
    drift: float = 0.0
    noise: float = 0.0

    def build(self) -> TwoStreamLayer:
        base = self.layer.build()
        rng = np.random.default_rng(self.layer.seed + 1)
        X = base.X
        d_in = X.shape[1]
        mixing = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)  # Δ
        rms = float(np.sqrt(np.mean(X**2))) or 1.0
        X_shift = X + self.drift * (X @ mixing) + self.noise * rms * rng.standard_normal(X.shape)
        return TwoStreamLayer(self, base.W, X, X_shift)


@st.composite
def two_stream_specs(draw: st.DrawFn, max_dim: int = 64) -> TwoStreamSpec:
    """Draw a :class:`TwoStreamSpec`: a hard layer with any dimensions ``1 … max_dim`` (``d_out ≠ d_in`` often,
    few calibration rows often: rank-deficient ``G`` and ``G'``) and a shift of each size in ``SHIFT_SIZES``."""
    layer = draw(layer_specs(max_dim=max_dim, block_sizes=(1,), max_blocks=max_dim))
    return TwoStreamSpec(layer, drift=draw(st.sampled_from(SHIFT_SIZES)), noise=draw(st.sampled_from(SHIFT_SIZES)))

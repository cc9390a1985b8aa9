"""``backends.torch.inference.ArmorLinear``: forward equals ``Ŵ x + bias``; constructors; shapes and dtypes (CPU).
The semi-structured (2:4 sparse kernel) path needs an NVIDIA GPU (compute capability >= 8.0) and is tested there."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from armor_ref.factorization import factorize  # noqa: E402
from armor_ref.masks import pack_2of4  # noqa: E402
from armor_ref.objectives import gram_matrix  # noqa: E402
from backends.torch.inference import ArmorLinear, pack_core, semi_structured_supported, unpack_core  # noqa: E402

D_OUT, D_IN, BLOCK = 32, 64, 16


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    linear = torch.nn.Linear(D_IN, D_OUT)
    X = rng.standard_normal((200, D_IN))
    result = factorize(
        linear.weight.detach().double().numpy(), gram_matrix(X), proxy="hessian", block_size=BLOCK, sweeps=2
    )
    return linear, result


def test_forward_equals_reconstruction_plus_bias(layer):
    linear, result = layer
    module = ArmorLinear.from_result(linear, result)
    x = torch.randn(5, D_IN)
    W_hat = torch.from_numpy(result.W_hat()).float()
    expected = x @ W_hat.T + linear.bias.detach()
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.to_dense(), W_hat, rtol=1e-5, atol=1e-6)
    assert not module.sparse and module.A.dtype == torch.float32


def test_batched_inputs_and_no_bias(layer):
    _, result = layer
    values, index = pack_2of4(result.S, result.M)
    module = ArmorLinear.from_file_tensors(result.A.astype(np.float32), result.B.astype(np.float32), values, index)
    x = torch.randn(2, 3, 7, D_IN)
    y = module(x)
    assert y.shape == (2, 3, 7, D_OUT) and module.bias is None
    expected = x @ torch.from_numpy(result.W_hat()).float().T
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert module(torch.randn(D_IN)).shape == (D_OUT,)  # a single vector
    assert module(torch.randn(0, D_IN)).shape == (0, D_OUT)  # no tokens


def test_file_tensors_and_result_constructors_agree(layer):
    linear, result = layer
    values, index = pack_2of4(result.S, result.M)
    a = ArmorLinear.from_file_tensors(
        torch.from_numpy(result.A),
        torch.from_numpy(result.B),
        torch.from_numpy(values),
        torch.from_numpy(index),
        bias=linear.bias,
    )
    b = ArmorLinear.from_result(linear, result)
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(a(x), b(x))


def test_dtype_handling(layer):
    linear, result = layer
    m64 = ArmorLinear.from_result(linear, result, dtype=torch.float64)
    x = torch.randn(3, D_IN, dtype=torch.float64)
    expected = x @ torch.from_numpy(result.W_hat()).T + linear.bias.detach().double()
    torch.testing.assert_close(m64(x), expected, rtol=1e-12, atol=1e-12)
    # inputs of another dtype are cast to the module's and the output back to the input's
    m32 = ArmorLinear.from_result(linear, result)
    y = m32(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    mbf = ArmorLinear.from_result(linear, result, dtype=torch.bfloat16)  # dense bf16 on the CPU
    assert not mbf.sparse
    torch.testing.assert_close(mbf(x.float()), expected.float(), rtol=0.1, atol=0.1)


def test_bad_inputs_and_sparse_needs_cuda(layer):
    linear, result = layer
    module = ArmorLinear.from_result(linear, result)
    with pytest.raises(ValueError, match="features"):
        module(torch.randn(2, D_IN + 4))
    with pytest.raises(ValueError, match="semi-structured"):
        ArmorLinear.from_result(linear, result, sparse=True)
    with pytest.raises(ValueError, match="do not fit"):
        ArmorLinear(torch.zeros(2, 16, 16), torch.zeros(4, 16, 16), torch.zeros(D_OUT, D_IN + 4))
    assert not semi_structured_supported((D_OUT, D_IN), torch.float16, torch.device("cpu"))


def test_weight_bytes_counts_every_factor(layer):
    linear, result = layer
    module = ArmorLinear.from_result(linear, result)
    assert module.weight_bytes() == 4 * (D_OUT * D_IN + (D_OUT + D_IN) * BLOCK + D_OUT)


def test_state_dict_is_the_exported_format_and_loads_into_a_placeholder(layer):
    """The state dict holds spec §6's tensors (what compress writes for this layer, bit for bit); an empty
    placeholder filled from it computes the same outputs."""
    linear, result = layer
    module = ArmorLinear.from_result(linear, result)
    state = module.state_dict()
    assert sorted(state) == ["armor.A", "armor.B", "armor.index", "armor.values", "bias"]
    values, index = pack_2of4(result.S, result.M)
    np.testing.assert_array_equal(state["armor.values"].numpy(), values.astype(np.float32))
    np.testing.assert_array_equal(state["armor.index"].numpy(), index)
    assert state["armor.index"].dtype == torch.uint8
    empty = ArmorLinear.empty(D_OUT, D_IN, BLOCK, bias=True, dtype=torch.float32, device="cpu")
    assert sorted(empty.state_dict()) == sorted(state) and empty.armor.packed
    empty.load_state_dict(state)
    assert not empty.armor.packed
    x = torch.randn(6, D_IN)
    torch.testing.assert_close(empty(x), module(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        ArmorLinear.empty(D_OUT, D_IN, 12, bias=False, dtype=torch.float32)


def test_packing_a_core_with_kept_zeros_keeps_the_core(layer):
    """A kept value that is exactly 0 makes the kept positions ambiguous; packing picks valid ones and the core
    (so Ŵ) comes back unchanged. A core with 3 non-zeros in a group is refused."""
    _, result = layer
    core = torch.from_numpy(result.S * result.M).float()
    core[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # one non-zero left in the first group
    values, index = pack_core(core)
    torch.testing.assert_close(unpack_core(values, index), core, rtol=0, atol=0)
    core[1, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="not 2:4"):
        pack_core(core)


def test_forward_with_autograd_matches_the_dense_layer(layer):
    """With autograd on, gradients reach the input and equal those of the dense ``Ŵ x + bias``; outputs equal the
    no-grad fast path's."""
    linear, result = layer
    module = ArmorLinear.from_result(linear, result)
    W_hat = torch.from_numpy(result.W_hat()).float()
    x = torch.randn(3, 5, D_IN, requires_grad=True)
    y = module(x)
    assert y.requires_grad
    (y * torch.arange(D_OUT)).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x_ref, W_hat, linear.bias.detach()) * torch.arange(D_OUT)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(module(x), y.detach(), rtol=0, atol=0)


def test_moving_and_casting_keep_the_layer(layer):
    """``.to(dtype)`` / ``.half()`` cast every factor and the core (re-placed: dense off CUDA)."""
    linear, result = layer
    module = ArmorLinear.from_result(linear, result)
    x = torch.randn(4, D_IN, dtype=torch.float64)
    expected = x @ torch.from_numpy(result.W_hat()).T + linear.bias.detach().double()
    module.to(torch.float64)
    assert module.core.dtype == module.A.dtype == torch.float64 and not module.sparse
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)
    module.half()
    assert module.core.dtype == torch.float16 and module.bias.dtype == torch.float16
    torch.testing.assert_close(module(x.float()), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_semi_structured_core_on_cuda():
    d_out, d_in, b = 256, 512, 32
    rng = np.random.default_rng(0)
    W = rng.standard_normal((d_out, d_in))
    result = factorize(W, gram_matrix(rng.standard_normal((600, d_in))), proxy="nowag", block_size=b, sweeps=1)
    linear = torch.nn.Linear(d_in, d_out).cuda().half()
    if not semi_structured_supported((d_out, d_in), torch.float16, torch.device("cuda")):
        pytest.skip("this GPU has no 2:4 sparse tensor cores")
    module = ArmorLinear.from_result(linear, result)
    assert module.sparse
    x = torch.randn(300, d_in, device="cuda", dtype=torch.float16)
    dense = ArmorLinear.from_result(linear, result, sparse=False)
    torch.testing.assert_close(module(x), dense(x), rtol=2e-2, atol=2e-2)
    factor_bytes = 2 * (d_out + d_in) * b + 2 * d_out  # A, B and bias in fp16
    assert module.weight_bytes() - factor_bytes < 0.6 * d_out * d_in * 2  # the core: about 0.56 of dense


def test_decode_graphs_only_on_cuda_and_never_copied(layer):
    """On the CPU a decode-size forward takes the eager path (no graph); a module copies without its graphs."""
    import copy

    linear, result = layer
    module = ArmorLinear.from_result(linear, result)
    with torch.no_grad():
        module(torch.randn(1, D_IN))
    assert module._graphs == {} and module.decode_max_tokens == 16
    module._graphs[1] = object()  # a stand-in for a captured graph
    assert copy.deepcopy(module)._graphs == {}


@pytest.fixture
def cuda_armor():
    """A 2:4 fp16 ArmorLinear on CUDA (semi-structured where the GPU has sparse tensor cores) and its input width."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    d_out, d_in, b = 256, 512, 32
    rng = np.random.default_rng(1)
    result = factorize(
        rng.standard_normal((d_out, d_in)), gram_matrix(rng.standard_normal((600, d_in))), "nowag", block_size=b,
        sweeps=1,
    )  # fmt: skip
    linear = torch.nn.Linear(d_in, d_out).cuda().half()
    return ArmorLinear.from_result(linear, result), d_in


def test_decode_graph_replays_the_eager_forward(cuda_armor):
    module, d_in = cuda_armor
    xs = {n: torch.randn(n, d_in, device="cuda", dtype=torch.float16) for n in (1, 3, 16)}
    with torch.no_grad():
        module.decode_max_tokens = 0
        eager = {n: module(x) for n, x in xs.items()}
        module.decode_max_tokens = 16
        first = {n: module(x) for n, x in xs.items()}  # captures one graph per token count
        graphs = dict(module._graphs)
        again = {n: module(x) for n, x in xs.items()}  # replays them
    assert sorted(graphs) == [1, 3, 16] and all(module._graphs[n] is graphs[n] for n in graphs)
    for n in xs:
        torch.testing.assert_close(first[n], eager[n], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(again[n], first[n], rtol=0, atol=0)
    # each output is the caller's own: a later replay does not overwrite an earlier result
    with torch.inference_mode():
        y1 = module(xs[1])
        module(torch.randn(1, d_in, device="cuda", dtype=torch.float16))
    torch.testing.assert_close(y1, eager[1], rtol=1e-3, atol=1e-3)


def test_decode_graph_is_skipped_or_recaptured_where_it_would_be_wrong(cuda_armor):
    module, d_in = cuda_armor
    x = torch.randn(4, d_in, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        module(torch.randn(17, d_in, device="cuda", dtype=torch.float16))  # beyond decode size: eager
    assert module._graphs == {}
    y = module(x.clone().requires_grad_())  # autograd: eager, and differentiable
    assert y.requires_grad and module._graphs == {}
    with torch.no_grad():
        before = module(x)
        module.float()  # the factors move: the graphs are dropped, the next call captures anew
        assert module._graphs == {}
        after = module(x.float())
    assert list(module._graphs) == [4]
    torch.testing.assert_close(after.half(), before, rtol=2e-2, atol=2e-2)

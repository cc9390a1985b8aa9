"""Inference with ARMOR factors: ``y = A (S (B x)) + bias`` as a ``torch.nn.Module``.

``A`` (R, b, b) and ``B`` (K, b, b) are block diagonal; their products are batched matmuls (``b × b`` blocks).
The 2:4 core ``S`` (d_out, d_in) is, on CUDA in float16/bfloat16 (compute capability ≥ 8.0),
a ``torch.sparse.to_sparse_semi_structured`` tensor (cuSPARSELt, or CUTLASS when cuSPARSELt is absent), so the
core product runs on the sparse tensor cores and the core takes a little over half the bytes of a dense weight;
elsewhere (CPU, float32/float64, old GPUs, unsupported shapes) it is a dense tensor. Moving a module
(``.to("cuda")``, ``.half()``) re-decides: the core becomes semi-structured exactly where it is supported.

Layout. Activations go through the three products transposed, ``xᵀ`` (d_in, N) → ``B xᵀ`` → ``S (B xᵀ)`` →
``A (S B xᵀ)``: each block-diagonal product is then one ``bmm`` over contiguous (K, b, N) / (R, b, N) views, and the
sparse product is ``sparse @ dense`` with a contiguous dense operand (what the semi-structured kernels take without
a transposed copy). Without autograd the last ``bmm`` writes straight into the (N, d_out) output; with autograd
(``out=`` is not differentiable) it is an ordinary ``bmm`` and one transposing copy. Shape constraints of PyTorch's
semi-structured tensors (fp16/bf16): the sparse matrix's rows a multiple of 32 and columns of 64 (CUTLASS; 16 and
16 for cuSPARSELt); the dense operand is padded by PyTorch to multiples of 8, so any token count works.

Decode-size batches. At 1–16 tokens the three products are a few microseconds of arithmetic each, and the launches
(the transposing copy, two ``bmm``, the sparse product with its padding, the bias) cost more than the work. On CUDA
without autograd, a forward of ``N ≤ decode_max_tokens`` tokens therefore replays a CUDA graph of the whole forward,
captured once per token count (after a warm-up on a side stream) into a memory pool shared by every ArmorLinear
on the device: one launch from the host, plus copying the input in and the output out. The graph is recaptured
when the factors move (their addresses are its key). Fusing the core product into one Triton kernel with the two
block-diagonal products was not done: Triton would need the core in a layout it can read (spec §6's values and
index), i.e. a second copy beside the semi-structured one (weights 1.1× dense instead of 0.56×), since
cuSPARSELt's compressed layout is opaque; the graph gets the launch saving without it.

State dict. :class:`ArmorLinear` keeps its factors in a child module ``armor`` (:class:`ArmorFactors`) whose
state-dict entries are exactly the spec §6 tensors, ``armor.A``, ``armor.B``, ``armor.values``, ``armor.index``
(plus the linear's ``bias``): a model holding ArmorLinear modules saves and loads the exported format under the
checkpoint's own names (``NAME.armor.*``), which is what lets ``transformers`` load a compressed directory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from armor_ref.masks import GROUP, KEEP, is_2of4, pack_2of4, select_2of4, unpack_2of4

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
_SPARSE_MIN_ROWS, _SPARSE_MIN_COLS = 32, 64  # the stricter (CUTLASS) constraints, so either kernel accepts the core
STORED = ("A", "B", "values", "index")  # the state-dict entries of ArmorFactors, spec §6's suffixes
#: token counts up to which a CUDA forward without autograd replays a captured CUDA graph (module docstring)
DECODE_MAX_TOKENS = 16
_GRAPH_POOLS: dict[torch.device, Any] = {}  # one CUDA graph memory pool per device, shared by every ArmorLinear


def semi_structured_supported(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``to_sparse_semi_structured`` can hold a core of ``shape`` in ``dtype`` on ``device``."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in SPARSE_DTYPES or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    rows, cols = shape
    return rows % _SPARSE_MIN_ROWS == 0 and cols % _SPARSE_MIN_COLS == 0


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t if dtype is None else t.to(dtype)


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def unpack_core(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The dense 2:4 core (d_out, d_in) of spec §6's ``values`` (d_out, d_in/2) and ``index`` (d_out, d_in/4), in
    ``values``' dtype and device (unpacked by :func:`armor_ref.masks.unpack_2of4`; float32 holds fp16/bf16
    exactly). ValueError on a malformed index."""
    core, _ = unpack_2of4(_as_numpy(values.float()), _as_numpy(index).astype(np.uint8))
    return torch.from_numpy(core).to(device=values.device, dtype=values.dtype)


def pack_core(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §6's ``values`` (core's dtype) and ``index`` (uint8) of a dense 2:4 core, on its device. The kept
    positions are the non-zeros, a group with fewer than 2 filled up with its first zero positions (the packed
    core, and so ``Ŵ``, is the same whichever zero is kept). ValueError if a group holds more than 2 non-zeros."""
    S = _as_numpy(core.float())
    if not is_2of4(S):
        raise ValueError("the core is not 2:4 sparse (a group of 4 holds more than 2 non-zeros)")
    values, index = pack_2of4(S, select_2of4((S != 0).astype(np.float64)))
    return torch.from_numpy(values).to(device=core.device, dtype=core.dtype), torch.from_numpy(index).to(core.device)


class ArmorFactors(torch.nn.Module):
    """The factors of one ARMOR linear, ``Ŵ = blockdiag(A) · S · blockdiag(B)``: buffers ``A`` (R, b, b), ``B``
    (K, b, b) and the 2:4 ``core`` (dense or semi-structured, see :meth:`place_core`).

    Its state dict holds spec §6's tensors, ``A``, ``B``, ``values``, ``index`` (packed from the core on save,
    unpacked on load). Built with ``packed=(values, index)`` instead of a core it is the *packed* placeholder that
    ``from_pretrained`` fills by name (typically on ``meta``); :meth:`unpack` then turns it into the computing form."""

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        core: torch.Tensor | None,
        sparse: bool | None = None,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("A", A.contiguous())
        self.register_buffer("B", B.contiguous())
        self.want_sparse = sparse
        self.sparse = False
        if core is not None:
            self.register_buffer("core", core.contiguous(), persistent=False)
            self.place_core()
        elif packed is not None:
            self.register_buffer("values", packed[0])
            self.register_buffer("index", packed[1])
        else:
            raise ValueError("ArmorFactors needs a core or its packed (values, index)")

    @property
    def packed(self) -> bool:
        return "core" not in self._buffers

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape[0] * self.A.shape[1], self.B.shape[0] * self.B.shape[1]

    def unpack(self) -> None:
        """Packed placeholder → computing form: the core unpacked from ``values`` and ``index``, which are dropped."""
        if self.packed:
            core = unpack_core(self.values, self.index)
            del self.values, self.index
            self.register_buffer("core", core, persistent=False)
            self.place_core()

    def place_core(self) -> None:
        """Make the core semi-structured where :func:`semi_structured_supported` (and not refused with
        ``sparse=False``), dense elsewhere; ``sparse=True`` insists (ValueError where unsupported)."""
        core = self.core_dense()
        supported = semi_structured_supported(tuple(core.shape), core.dtype, core.device)
        if self.want_sparse and not supported:
            d_out, d_in = core.shape
            raise ValueError(
                f"a semi-structured core needs CUDA (compute capability >= 8.0), float16/bfloat16 and a {d_out}×{d_in} "
                f"core with rows a multiple of {_SPARSE_MIN_ROWS} and columns of {_SPARSE_MIN_COLS}"
            )
        self.sparse = supported if self.want_sparse is None else bool(self.want_sparse)
        self.core = torch.sparse.to_sparse_semi_structured(core) if self.sparse else core

    def core_dense(self) -> torch.Tensor:
        """The core ``S`` as a dense (d_out, d_in) tensor."""
        return self.core.to_dense() if self.sparse else self.core

    def _apply(self, fn: Any, recurse: bool = True) -> ArmorFactors:
        """Moves and casts (``.to``, ``.half()``, ``.cuda()``) act on a dense core, then the core is placed again."""
        if self.sparse:
            self.core = self.core.to_dense()
            self.sparse = False
        super()._apply(fn, recurse)
        if not self.packed and not self.core.is_meta:
            self.place_core()
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.packed:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        values, index = pack_core(self.core_dense())
        for name, tensor in zip(STORED, (self.A, self.B, values, index), strict=True):
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        missing = [prefix + name for name in STORED if prefix + name not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        dtype, device = self.A.dtype, self.A.device
        A, B, values, index = (state_dict[prefix + name] for name in STORED)
        if tuple(A.shape) != tuple(self.A.shape) or tuple(B.shape) != tuple(self.B.shape):
            error_msgs.append(
                f"{prefix}A/B have shapes {tuple(A.shape)}/{tuple(B.shape)}, expected "
                f"{tuple(self.A.shape)}/{tuple(self.B.shape)}"
            )
            return
        self.A = A.detach().to(device=device, dtype=dtype)
        self.B = B.detach().to(device=device, dtype=dtype)
        if self.packed:
            del self.values, self.index
        self.register_buffer("core", unpack_core(values.detach().to(device=device, dtype=dtype), index), False)
        self.place_core()

    def extra_repr(self) -> str:
        return f"block_size={self.A.shape[-1]}, sparse={self.sparse}, packed={self.packed}"


class ArmorLinear(torch.nn.Module):
    """A linear layer stored as ARMOR factors, ``Ŵ = blockdiag(A) · S · blockdiag(B)``, computing ``Ŵ x + bias``.

    Build it with :meth:`from_file_tensors` (spec §6 tensors: ``A``, ``B``, ``values``, ``index``),
    :meth:`from_result` (an ``nn.Linear`` and its :class:`~armor_ref.factorization.ArmorResult`) or :meth:`empty`
    (a placeholder filled through the state dict). ``sparse``: ``None`` picks the semi-structured core wherever
    :func:`semi_structured_supported`; ``True`` insists (error where unsupported); ``False`` keeps it dense. Inputs of
    another dtype are cast to the module's and back. The factors are buffers (not trained by an optimiser); the
    forward runs with autograd on (gradients flow to the input). ``decode_max_tokens`` (default
    :data:`DECODE_MAX_TOKENS`; 0 turns it off): on CUDA without autograd, forwards of up to that many tokens replay a
    CUDA graph captured per token count (module docstring).
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        core: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        sparse: bool | None = None,
    ) -> None:
        super().__init__()
        d_out, d_in = core.shape
        _check_shapes(A.shape, B.shape, d_out, d_in, None if bias is None else bias.shape)
        place = {"device": torch.device(device), "dtype": dtype}
        self.armor = ArmorFactors(A.to(**place), B.to(**place), core.to(**place), sparse)
        self.register_buffer("bias", None if bias is None else bias.to(**place).contiguous())
        self.decode_max_tokens = DECODE_MAX_TOKENS
        self._graphs: dict[int, _DecodeGraph] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Constructors
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_file_tensors(
        cls, A: Any, B: Any, values: Any, index: Any, bias: Any | None = None, **kwargs: Any
    ) -> ArmorLinear:
        """From the exported tensors of spec §6 (NumPy arrays or torch tensors): ``NAME.armor.A`` (R, b, b),
        ``.B`` (K, b, b), ``.values`` (d_out, d_in/2), ``.index`` uint8 (d_out, d_in/4), and the layer's bias."""
        core = unpack_core(_as_tensor(values, torch.float32), _as_tensor(index))
        return cls(
            _as_tensor(A, torch.float32),
            _as_tensor(B, torch.float32),
            core,
            None if bias is None else _as_tensor(bias, torch.float32),
            **kwargs,
        )

    @classmethod
    def from_result(cls, linear: torch.nn.Linear, result: Any, **kwargs: Any) -> ArmorLinear:
        """From an ``nn.Linear`` (for its bias, and to check shapes) and the ``ArmorResult`` of its weight.
        Keyword defaults: the linear's dtype and device."""
        if tuple(result.S.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"result core {tuple(result.S.shape)} does not match {linear}")
        kwargs.setdefault("dtype", linear.weight.dtype)
        kwargs.setdefault("device", linear.weight.device)
        core = _as_tensor(result.S, torch.float64) * _as_tensor(result.M).to(torch.float64)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(_as_tensor(result.A), _as_tensor(result.B), core, bias, **kwargs)

    @classmethod
    def empty(
        cls,
        d_out: int,
        d_in: int,
        block_size: int,
        bias: bool,
        dtype: torch.dtype,
        device: Any = "meta",
        sparse: bool | None = None,
    ) -> ArmorLinear:
        """A placeholder of the given shape, its factors packed and uninitialised (``A``, ``B``, ``values`` in
        ``dtype``, ``index`` uint8), to be filled by name (``armor.A``, ``armor.B``, ``armor.values``,
        ``armor.index``, ``bias``) and :meth:`unpack`-ed. ValueError when ``block_size`` does not tile the layer
        into groups of 4."""
        b = block_size
        _check_shapes((d_out // max(b, 1), b, b), (d_in // max(b, 1), b, b), d_out, d_in, None)
        place = {"dtype": dtype, "device": device}
        packed = (
            torch.empty(d_out, d_in // KEEP, **place),
            torch.empty(d_out, d_in // GROUP, dtype=torch.uint8, device=device),
        )
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.armor = ArmorFactors(
            torch.empty(d_out // b, b, b, **place), torch.empty(d_in // b, b, b, **place), None, sparse, packed
        )
        module.register_buffer("bias", torch.empty(d_out, **place) if bias else None)
        module.decode_max_tokens = DECODE_MAX_TOKENS
        module._graphs = {}
        return module

    def unpack(self) -> None:
        """After the factors of an :meth:`empty` module were filled in: build the computing core."""
        self.armor.unpack()

    # ------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------
    @property
    def A(self) -> torch.Tensor:
        return self.armor.A

    @property
    def B(self) -> torch.Tensor:
        return self.armor.B

    @property
    def core(self) -> torch.Tensor:
        return self.armor.core

    @property
    def sparse(self) -> bool:
        return self.armor.sparse

    @property
    def in_features(self) -> int:
        return self.armor.shape[1]

    @property
    def out_features(self) -> int:
        return self.armor.shape[0]

    @property
    def block_size(self) -> int:
        return self.armor.A.shape[-1]

    # ------------------------------------------------------------------------------------------------------------
    # Forward and checks
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        in_dtype = x.dtype
        x2 = x.reshape(-1, self.in_features).to(self.armor.A.dtype)
        out = self._replay(x2) if self._decode_size(x2) else self._products(x2)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def _products(self, x2: torch.Tensor) -> torch.Tensor:
        """``A (S (B x2ᵀ)) + bias`` as (N, d_out), for ``x2`` (N, d_in) in the module's dtype."""
        A, B, core = self.armor.A, self.armor.B, self.armor.core
        N = x2.shape[0]
        K, R, b = B.shape[0], A.shape[0], self.block_size
        hT = torch.bmm(B, x2.t().reshape(K, b, N))  # blockdiag(B) xᵀ: (K, b, N)
        yT = core @ hT.view(K * b, N)  # S (B xᵀ): (d_out, N)
        if torch.is_grad_enabled() and (yT.requires_grad or A.requires_grad):
            out = torch.bmm(A, yT.view(R, b, N)).permute(2, 0, 1).reshape(N, self.out_features)  # A (…): (N, d_out)
            if self.bias is not None:
                out = out + self.bias
        else:  # no autograd: the last product written straight into the (N, d_out) output, bias added in place
            out = torch.empty((N, self.out_features), dtype=yT.dtype, device=yT.device)
            torch.bmm(A, yT.view(R, b, N), out=out.view(N, R, b).permute(1, 2, 0))
            if self.bias is not None:
                out += self.bias
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Decode-size batches: a captured CUDA graph per token count
    # ------------------------------------------------------------------------------------------------------------
    def _decode_size(self, x2: torch.Tensor) -> bool:
        """Whether this forward replays a CUDA graph: CUDA, ``1 ≤ N ≤ decode_max_tokens``, no autograd, not inside
        another capture."""
        return (
            x2.is_cuda
            and 1 <= x2.shape[0] <= self.decode_max_tokens
            and not (torch.is_grad_enabled() and (x2.requires_grad or self.armor.A.requires_grad))
            and not torch.cuda.is_current_stream_capturing()
        )

    def _graph_key(self, x2: torch.Tensor) -> tuple:
        """What a captured graph depends on: the token count, the device and the addresses of every factor."""
        core = self.armor.core
        parts = [getattr(core, name, None) for name in ("packed", "meta")] if self.sparse else [core]
        tensors = [self.armor.A, self.armor.B, self.bias, *parts]
        return (x2.shape[0], x2.device, *(None if t is None else t.data_ptr() for t in tensors))

    def _replay(self, x2: torch.Tensor) -> torch.Tensor:
        """The forward of ``x2`` by a captured CUDA graph (captured on first use for its token count)."""
        key = self._graph_key(x2)
        graph = self._graphs.get(key[0])
        if graph is None or graph.key != key:
            try:
                graph = self._graphs[key[0]] = _DecodeGraph.capture(self, key, x2)
            except RuntimeError as exc:  # a kernel that cannot be captured: this module stays eager
                warnings.warn(f"ArmorLinear: CUDA graph capture failed ({exc}); decoding without graphs", stacklevel=3)
                self.decode_max_tokens = 0
                return self._products(x2)
        graph.input.copy_(x2)
        graph.graph.replay()
        return graph.output.clone()

    def _apply(self, fn: Any, recurse: bool = True) -> ArmorLinear:
        self._graphs = {}  # moved or cast factors: every graph is stale
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_graphs": {}}  # graphs are neither copied nor pickled

    def core_dense(self) -> torch.Tensor:
        """The core ``S`` as a dense (d_out, d_in) tensor."""
        return self.armor.core_dense()

    def to_dense(self) -> torch.Tensor:
        """``Ŵ = blockdiag(A) · S · blockdiag(B)`` (d_out, d_in), computed in float32 (float64 for a float64 module)."""
        A, B = self.armor.A, self.armor.B
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        S = self.core_dense().to(work)
        R, b, _ = A.shape
        K = B.shape[0]
        SB = torch.bmm(S.view(-1, K, b).transpose(0, 1), B.to(work)).transpose(0, 1).reshape(-1, K * b)
        return torch.bmm(A.to(work), SB.view(R, b, -1)).reshape(R * b, -1)

    def weight_bytes(self) -> int:
        """Bytes of the stored weights: ``A``, ``B``, the core (packed values and metadata when sparse), and bias."""
        core = self.armor.core
        if self.sparse:
            parts = [getattr(core, name, None) for name in ("packed", "meta")]
            core_bytes = sum(t.numel() * t.element_size() for t in parts if t is not None)
        else:
            core_bytes = core.numel() * core.element_size()
        extra = [self.armor.A, self.armor.B] + ([self.bias] if self.bias is not None else [])
        return core_bytes + sum(t.numel() * t.element_size() for t in extra)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"bias={self.bias is not None}, sparse={self.sparse}, dtype={self.armor.A.dtype}"
        )


@dataclass
class _DecodeGraph:
    """A CUDA graph of one ArmorLinear forward for a fixed token count: it reads ``input`` (N, d_in) and writes
    ``output`` (N, d_out), both allocated at capture and reused by every replay."""

    key: tuple
    input: torch.Tensor
    output: torch.Tensor
    graph: Any  # torch.cuda.CUDAGraph

    @classmethod
    def capture(cls, module: ArmorLinear, key: tuple, like: torch.Tensor) -> _DecodeGraph:
        """Warm up on a side stream (library handles, cuSPARSELt's plan), then capture ``module._products`` into
        the device's shared pool. The static tensors are ordinary ones (not inference tensors), so that the
        module can decode inside and outside ``torch.inference_mode`` alike."""
        device = like.device
        with torch.inference_mode(False), torch.no_grad():
            static_in = torch.zeros(like.shape, dtype=like.dtype, device=device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    module._products(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            if device not in _GRAPH_POOLS:
                _GRAPH_POOLS[device] = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=_GRAPH_POOLS[device]):
                static_out = module._products(static_in)
        return cls(key, static_in, static_out, graph)


def _check_shapes(A_shape: Any, B_shape: Any, d_out: int, d_in: int, bias_shape: Any | None) -> None:
    """ValueError unless ``A`` (R, b, b) and ``B`` (K, b, b) tile a (d_out, d_in) core, ``b`` a multiple of 4."""
    R, b, b2 = tuple(A_shape)
    K = B_shape[0]
    if b != b2 or tuple(B_shape[1:]) != (b, b) or R * b != d_out or K * b != d_in or b % GROUP or b == 0:
        raise ValueError(f"factor shapes A {tuple(A_shape)}, B {tuple(B_shape)} do not fit a core of {d_out}×{d_in}")
    if bias_shape is not None and tuple(bias_shape) != (d_out,):
        raise ValueError(f"bias shape {tuple(bias_shape)} does not match {d_out} outputs")

"""Inference with ARMOR factors: ``y = A (S (B x)) + bias`` as a ``torch.nn.Module``.

``A`` (R, b, b) and ``B`` (K, b, b) are block diagonal; their products are batched matmuls (``b × b`` blocks).
The 2:4 core ``S`` (d_out, d_in) is, on CUDA in float16/bfloat16 (compute capability ≥ 8.0),
a ``torch.sparse.to_sparse_semi_structured`` tensor (cuSPARSELt, or CUTLASS when cuSPARSELt is absent), so the
core product runs on the sparse tensor cores and the core takes a little over half the bytes of a dense weight;
elsewhere (CPU, float32/float64, old GPUs, unsupported shapes) it is a dense tensor.

Layout. Activations go through the three products transposed, ``xᵀ`` (d_in, N) → ``B xᵀ`` → ``S (B xᵀ)`` →
``A (S B xᵀ)``: each block-diagonal product is then one ``bmm`` over contiguous (K, b, N) / (R, b, N) views, and the
sparse product is ``sparse @ dense`` with a contiguous dense operand (what the semi-structured kernels take without
a transposed copy). The last ``bmm`` writes straight into the (N, d_out) output. Shape constraints of PyTorch's
semi-structured tensors (fp16/bf16): the sparse matrix's rows a multiple of 32 and columns of 64 (CUTLASS; 16 and
16 for cuSPARSELt); the dense operand is padded by PyTorch to multiples of 8, so any token count works.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from armor_ref.masks import GROUP, unpack_2of4

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
_SPARSE_MIN_ROWS, _SPARSE_MIN_COLS = 32, 64  # the stricter (CUTLASS) constraints, so either kernel accepts the core


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


class ArmorLinear(torch.nn.Module):
    """A linear layer stored as ARMOR factors, ``Ŵ = blockdiag(A) · S · blockdiag(B)``, computing ``Ŵ x + bias``.

    Build it with :meth:`from_file_tensors` (spec §6 tensors: ``A``, ``B``, ``values``, ``index``) or
    :meth:`from_result` (an ``nn.Linear`` and its :class:`~armor_ref.factorization.ArmorResult`). ``sparse``:
    ``None`` picks the semi-structured core wherever :func:`semi_structured_supported`; ``True`` insists (error
    where unsupported); ``False`` keeps it dense. Inputs of another dtype are cast to the module's and back.
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
        device = torch.device(device)
        d_out, d_in = core.shape
        R, b, b2 = A.shape
        K = B.shape[0]
        if b != b2 or tuple(B.shape[1:]) != (b, b) or R * b != d_out or K * b != d_in or b % GROUP:
            raise ValueError(
                f"factor shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a core of {d_out}×{d_in}"
            )
        if bias is not None and tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match {d_out} outputs")
        self.in_features, self.out_features, self.block_size = d_in, d_out, b
        self.register_buffer("A", A.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("B", B.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype).contiguous())
        core = core.to(device=device, dtype=dtype).contiguous()
        supported = semi_structured_supported((d_out, d_in), dtype, device)
        if sparse and not supported:
            raise ValueError(
                f"a semi-structured core needs CUDA (compute capability >= 8.0), float16/bfloat16 and a {d_out}×{d_in} "
                f"core with rows a multiple of {_SPARSE_MIN_ROWS} and columns of {_SPARSE_MIN_COLS}"
            )
        self.sparse = supported if sparse is None else bool(sparse)
        if self.sparse:
            core = torch.sparse.to_sparse_semi_structured(core)
        self.register_buffer("core", core)

    # ------------------------------------------------------------------------------------------------------------
    # Constructors
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_file_tensors(
        cls, A: Any, B: Any, values: Any, index: Any, bias: Any | None = None, **kwargs: Any
    ) -> ArmorLinear:
        """From the exported tensors of spec §6 (NumPy arrays or torch tensors): ``NAME.armor.A`` (R, b, b),
        ``.B`` (K, b, b), ``.values`` (d_out, d_in/2), ``.index`` uint8 (d_out, d_in/4), and the layer's bias."""
        core, _ = unpack_2of4(_as_numpy(values).astype(np.float32), _as_numpy(index).astype(np.uint8))
        return cls(
            _as_tensor(A, torch.float32),
            _as_tensor(B, torch.float32),
            torch.from_numpy(core),
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

    # ------------------------------------------------------------------------------------------------------------
    # Forward and checks
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        in_dtype = x.dtype
        x2 = x.reshape(-1, self.in_features).to(self.A.dtype)
        N = x2.shape[0]
        K, R, b = self.B.shape[0], self.A.shape[0], self.block_size
        hT = torch.bmm(self.B, x2.t().reshape(K, b, N))  # blockdiag(B) xᵀ: (K, b, N)
        yT = self.core @ hT.view(K * b, N)  # S (B xᵀ): (d_out, N)
        out = torch.empty((N, self.out_features), dtype=yT.dtype, device=yT.device)
        torch.bmm(self.A, yT.view(R, b, N), out=out.view(N, R, b).permute(1, 2, 0))  # A (…) written as (N, d_out)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def core_dense(self) -> torch.Tensor:
        """The core ``S`` as a dense (d_out, d_in) tensor."""
        return self.core.to_dense() if self.sparse else self.core

    def to_dense(self) -> torch.Tensor:
        """``Ŵ = blockdiag(A) · S · blockdiag(B)`` (d_out, d_in), computed in float32 (float64 for a float64 module)."""
        work = torch.float64 if self.A.dtype == torch.float64 else torch.float32
        S = self.core_dense().to(work)
        R, b, _ = self.A.shape
        K = self.B.shape[0]
        SB = torch.bmm(S.view(-1, K, b).transpose(0, 1), self.B.to(work)).transpose(0, 1).reshape(-1, K * b)
        return torch.bmm(self.A.to(work), SB.view(R, b, -1)).reshape(R * b, -1)

    def weight_bytes(self) -> int:
        """Bytes of the stored weights: ``A``, ``B``, the core (packed values and metadata when sparse), and bias."""
        if self.sparse:
            parts = [getattr(self.core, name, None) for name in ("packed", "meta")]
            core = sum(t.numel() * t.element_size() for t in parts if t is not None)
        else:
            core = self.core.numel() * self.core.element_size()
        extra = [self.A, self.B] + ([self.bias] if self.bias is not None else [])
        return core + sum(t.numel() * t.element_size() for t in extra)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"bias={self.bias is not None}, sparse={self.sparse}, dtype={self.A.dtype}"
        )

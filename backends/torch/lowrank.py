"""Inference with a low-rank layer: ``y = U (V x) + bias`` as a ``torch.nn.Module`` (docs/aa-svd-spec.md §5).

State dict. :class:`LowRankLinear` keeps its factors in a child module ``lowrank`` whose state-dict entries are
exactly the stored tensors, ``lowrank.U`` (d_out, k) and ``lowrank.V`` (k, d_in), plus the linear's ``bias``: a
model holding LowRankLinear modules saves and loads the exported format under the checkpoint's own names
(``NAME.lowrank.*``), which is what lets ``transformers`` load a compressed directory (:mod:`toolkit.hf`). The factors
are buffers, like :class:`~backends.torch.inference.ArmorLinear`'s: not trained by an optimiser; the forward runs
with autograd on (gradients reach the input).
"""

from __future__ import annotations

from typing import Any

import torch


class LowRankFactors(torch.nn.Module):
    """The two factors of a low-rank layer, buffers ``U`` (d_out, k) and ``V`` (k, d_in)."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor) -> None:
        super().__init__()
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"factors U {tuple(U.shape)} and V {tuple(V.shape)} do not multiply")
        self.register_buffer("U", U.contiguous())
        self.register_buffer("V", V.contiguous())

    def extra_repr(self) -> str:
        return f"rank={self.U.shape[1]}"


class LowRankLinear(torch.nn.Module):
    """A linear layer stored as ``W' = U V`` (rank k), computing ``U (V x) + bias`` in ``k (d_out + d_in)``
    multiply-adds per token instead of ``d_out d_in``. Inputs of another dtype are cast to the module's and back."""

    def __init__(
        self,
        U: torch.Tensor,
        V: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        place: dict[str, Any] = {"dtype": dtype, "device": torch.device(device)}
        self.lowrank = LowRankFactors(U.to(**place), V.to(**place))
        if bias is not None and tuple(bias.shape) != (U.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match {U.shape[0]} outputs")
        self.register_buffer("bias", None if bias is None else bias.to(**place).contiguous())

    @classmethod
    def empty(
        cls, d_out: int, d_in: int, rank: int, bias: bool, dtype: torch.dtype, device: Any = "meta"
    ) -> LowRankLinear:
        """A placeholder of the given shape and rank, uninitialised, to be filled by name (``lowrank.U``,
        ``lowrank.V``, ``bias``)."""
        if not 1 <= rank <= min(d_out, d_in):
            raise ValueError(f"rank {rank} is outside 1..{min(d_out, d_in)} for a {d_out}×{d_in} layer")
        place = {"dtype": dtype, "device": device}
        U, V = torch.empty(d_out, rank, **place), torch.empty(rank, d_in, **place)
        return cls(U, V, torch.empty(d_out, **place) if bias else None, dtype=dtype, device=device)

    @property
    def in_features(self) -> int:
        return self.lowrank.V.shape[1]

    @property
    def out_features(self) -> int:
        return self.lowrank.U.shape[0]

    @property
    def rank(self) -> int:
        return self.lowrank.U.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        U, V = self.lowrank.U, self.lowrank.V
        y = torch.nn.functional.linear(torch.nn.functional.linear(x.to(U.dtype), V), U, self.bias)
        return y.to(x.dtype)

    def to_dense(self) -> torch.Tensor:
        """``W' = U V`` (d_out, d_in)."""
        return self.lowrank.U @ self.lowrank.V

    def weight_bytes(self) -> int:
        """Bytes of the stored weights: ``U``, ``V`` and the bias."""
        parts = [self.lowrank.U, self.lowrank.V] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, dtype={self.lowrank.U.dtype}"
        )

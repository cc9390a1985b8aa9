"""Shared fixtures: a small random model file and its calibration activations, written to a temp directory."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

D_OUT, D_IN, TOKENS = 64, 128, 200
FAST = ["--block-size", "16", "--sweeps", "2"]  # CLI options that keep a factorization well under a second


@dataclass
class SmallModel:
    """``weights`` (l1.weight 64x128, l2.weight 32x128, l1.bias, norm.weight) and ``calib`` (200, 128)."""

    dir: Path
    weights: Path
    calib: Path
    tensors: dict[str, np.ndarray]
    X: np.ndarray


def make_small_model(directory: Path, seed: int = 0) -> SmallModel:
    rng = np.random.default_rng(seed)
    tensors = {
        "l1.weight": rng.standard_normal((D_OUT, D_IN)).astype(np.float32),
        "l1.bias": rng.standard_normal(D_OUT).astype(np.float32),
        "l2.weight": rng.standard_normal((32, D_IN)).astype(np.float32),
        "norm.weight": np.ones(D_IN, dtype=np.float32),
    }
    # correlated activations with uneven channel scales, like real ones
    X = (rng.standard_normal((TOKENS, D_IN)) @ rng.standard_normal((D_IN, D_IN)) * 0.1).astype(np.float32)
    X *= rng.uniform(0.2, 3.0, size=D_IN).astype(np.float32)
    weights, calib = directory / "model.safetensors", directory / "acts.npy"
    save_file(tensors, str(weights), metadata={"format": "np"})
    np.save(calib, X)
    return SmallModel(directory, weights, calib, tensors, X)


@pytest.fixture
def small_model(tmp_path: Path) -> SmallModel:
    return make_small_model(tmp_path)


def write_raw_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]], metadata=None) -> None:
    """Write a safetensors file by hand: ``{name: (dtype, shape, raw little-endian bytes)}`` (for BF16)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))

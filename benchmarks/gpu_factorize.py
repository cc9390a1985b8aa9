"""ARMOR factorization at LLM scale on one NVIDIA GPU (torch backend, float32), next to SparseGPT on the same GPU.

Shapes (d_out × d_in) of Llama-2-7B and Llama-3-8B linears: 4096×4096 (attention), 11008×4096 and 4096×11008
(Llama-2 MLP up/down), 14336×4096 (Llama-3 MLP up). Calibration: 128 sequences × 2048 tokens of **synthetic**
LLM-like activations, generated here (nothing is downloaded): a low-rank shared component plus noise, log-normal
channel scales and a few outlier channels 20-100× larger (the massive-activation channels of real LLMs); weights
are Gaussian with log-normal row scales. These are for timing and memory, not for quality claims.

For every shape: SparseGPT time (torch, GPU); then ``factorize`` at default settings (hessian proxy, SparseGPT start,
20 sweeps, block 32) with the time of every sweep, the time at which the loss first comes within 1 % of the final
(default-settings) loss, and the peak GPU memory (``torch.cuda.max_memory_allocated``). The run's final loss is the
reference's default-settings loss up to float32 round-off (same algorithm, same schedule; see backends/).
Run on a GPU machine from the repository root::

    python benchmarks/gpu_factorize.py [--shapes 4096x11008,...] [--proxy hessian] [--sweeps N]

Writes ``benchmarks/results/gpu_factorize.json`` (GPU model, torch and CUDA versions) after every shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_factorize.json"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
SEQUENCES, SEQLEN = 128, 2048


def synthetic_gram(d_in: int, tokens: int, device: torch.device, seed: int = 0, chunk: int = 8192) -> torch.Tensor:
    """``XᵀX`` (float64, on the CPU) of ``tokens`` synthetic LLM-like activation rows, accumulated chunk by chunk on the
    GPU: ``X = (Z U) + ε``, scaled per channel (log-normal), ~0.5 % outlier channels ×20-100."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = 64
    U = torch.randn(rank, d_in, generator=g, device=device) / rank**0.5
    scale = torch.exp(0.5 * torch.randn(d_in, generator=g, device=device))
    outliers = torch.randperm(d_in, generator=g, device=device)[: max(1, d_in // 200)]
    scale[outliers] *= 20 + 80 * torch.rand(len(outliers), generator=g, device=device)
    H = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        X = torch.randn(n, rank, generator=g, device=device) @ U + torch.randn(n, d_in, generator=g, device=device)
        X *= scale
        H += (X.T @ X).double()
        del X
    return H.cpu()


def synthetic_weight(d_out: int, d_in: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((d_out, d_in)) * np.exp(0.3 * rng.standard_normal((d_out, 1))) / np.sqrt(d_in)


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


def run_shape(d_out: int, d_in: int, proxy: str, sweeps: int | None, device: torch.device) -> dict:
    from backends.baselines import prune_sparsegpt
    from backends.factorization import factorize

    t0 = time.perf_counter()
    gram = synthetic_gram(d_in, SEQUENCES * SEQLEN, device)
    gram_seconds = time.perf_counter() - t0
    W = synthetic_weight(d_out, d_in)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        prune_sparsegpt(torch.from_numpy(W).to(device, torch.float32), gram.to(device, torch.float32))
    torch.cuda.synchronize()
    sparsegpt_seconds = time.perf_counter() - t0
    sparsegpt_peak = torch.cuda.max_memory_allocated()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    stamps: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()

    def on_sweep(sweep: int, loss: float) -> None:
        stamps.append((sweep, time.perf_counter() - t0, loss))
        print(f"    sweep {sweep:3d}  {stamps[-1][1]:8.1f} s  loss {loss:.6g}", flush=True)

    result = factorize(
        W, gram.numpy(), proxy=proxy, sweeps=sweeps, library="torch", device=str(device), on_sweep=on_sweep
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    within = next((t for _, t, loss in stamps if loss <= result.loss * 1.01), seconds)
    row = {
        "shape": [d_out, d_in],
        "proxy": proxy,
        "tokens": SEQUENCES * SEQLEN,
        "gram_seconds": gram_seconds,
        "sparsegpt_seconds": sparsegpt_seconds,
        "sparsegpt_peak_gib": sparsegpt_peak / 2**30,
        "armor_seconds": seconds,
        "armor_seconds_to_within_1pct_of_final": within,
        "armor_peak_gib": peak / 2**30,
        "sweeps": result.sweeps,
        "baseline_loss": result.baseline_loss,
        "loss": result.loss,
        "loss_over_sparsegpt": result.loss / result.baseline_loss,
        "trace": [{"sweep": s, "seconds": t, "loss": loss} for s, t, loss in stamps],
    }
    print(
        f"  SparseGPT {sparsegpt_seconds:.1f} s; ARMOR {seconds:.1f} s (1 % of final at {within:.1f} s), "
        f"peak {peak / 2**30:.1f} GiB, loss/SparseGPT {row['loss_over_sparsegpt']:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--proxy", default="hessian", choices=["hessian", "nowag"])
    parser.add_argument("--sweeps", type=int, default=None, help="default: the reference's cap and tolerance")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_factorize.py needs an NVIDIA GPU with CUDA; none is visible to torch here")
    device = torch.device("cuda")
    calibration = f"{SEQUENCES}x{SEQLEN} synthetic LLM-like tokens (outlier channels)"
    report = {
        "machine": gpu_info(),
        "calibration": calibration,
        "weights": "synthetic Gaussian, log-normal row scales",
        "dtype": "float32",
        "layers": [],
    }
    for spec in args.shapes.split(","):
        d_out, d_in = (int(v) for v in spec.lower().split("x"))
        print(f"{d_out}x{d_in} {args.proxy}", flush=True)
        report["layers"].append(run_shape(d_out, d_in, args.proxy, args.sweeps, device))
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print("| shape | SparseGPT s | ARMOR s | within 1 % s | peak GiB | loss / SparseGPT |")
    print("|---|---|---|---|---|---|")
    for r in report["layers"]:
        print(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['sparsegpt_seconds']:.1f} | {r['armor_seconds']:.1f} | "
            f"{r['armor_seconds_to_within_1pct_of_final']:.1f} | {r['armor_peak_gib']:.1f} | "
            f"{r['loss_over_sparsegpt']:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Inference latency and weight bytes on one NVIDIA GPU: dense ``nn.Linear``, plain 2:4 and ARMOR, fp16.

Shapes (d_out × d_in) of Llama-2-7B / Llama-3-8B linears (4096×4096, 11008×4096, 4096×11008, 14336×4096); token
batches 1, 16, 128, 2048, 8192. Weights are random (latency does not depend on the values); the 2:4 core is the
magnitude mask of a random matrix, ``A`` and ``B`` random 32×32 blocks.

* dense:      ``torch.nn.Linear`` (cuBLAS), no bias.
* plain 2:4:  ``F.linear(x, to_sparse_semi_structured(W))`` — the semi-structured kernel with no wrappers.
* plain 2:4 (ᵀ): ``W_sparse @ xᵀ`` — the same kernel in the transposed layout ArmorLinear uses for its core.
* ARMOR:      ``backends.torch.inference.ArmorLinear`` (``A (S (B x))``, same semi-structured core).

Latency: CUDA events, median of ``--reps`` after warm-up, ``torch.inference_mode``. Weight bytes: dense
``d_out·d_in·2``; sparse: the packed values and metadata; ARMOR adds ``A`` and ``B``. Targets (issue 4): at ≥ 2048
tokens ARMOR ≥ 1.3× faster than dense and within 1.15× of plain 2:4; weights ≤ 0.6× dense. Run on a GPU machine
(compute capability ≥ 8.0) from the repository root::

    python benchmarks/gpu_inference.py

Writes ``benchmarks/results/gpu_inference.json`` with the GPU model and the torch, CUDA and cuSPARSELt versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_inference.json"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
TOKENS = [1, 16, 128, 2048, 8192]
BLOCK = 32


def time_ms(fn: Callable[[], torch.Tensor], reps: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sparse_bytes(t: torch.Tensor) -> int:
    return sum(
        p.numel() * p.element_size() for p in (getattr(t, "packed", None), getattr(t, "meta", None)) if p is not None
    )


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return {
        "gpu": props.name,
        "compute_capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt,
        "semi_structured_backend": "cutlass" if cusparselt is None else "cusparselt",
    }


def run_shape(d_out: int, d_in: int, reps: int) -> list[dict]:
    from backends.masks import select_2of4
    from backends.torch.inference import ArmorLinear

    dev, dt = torch.device("cuda"), torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(d_out, d_in, generator=g, device=dev, dtype=dt) / d_in**0.5
    W24 = W * select_2of4(W.abs().float())
    dense = torch.nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dt)
    dense.weight.data.copy_(W)
    W_sparse = torch.sparse.to_sparse_semi_structured(W24.contiguous())
    A = torch.randn(d_out // BLOCK, BLOCK, BLOCK, generator=g, device=dev) / BLOCK**0.5
    B = torch.randn(d_in // BLOCK, BLOCK, BLOCK, generator=g, device=dev) / BLOCK**0.5
    armor = ArmorLinear(A, B, W24.float(), dtype=dt, device=dev, sparse=True)
    dense_bytes = d_out * d_in * 2
    plain_bytes = sparse_bytes(W_sparse)
    rows = []
    for n in TOKENS:
        x = torch.randn(n, d_in, generator=g, device=dev, dtype=dt)
        xT = x.t().contiguous()
        with torch.inference_mode():
            t_dense = time_ms(lambda: dense(x), reps)  # noqa: B023
            t_plain = time_ms(lambda: torch.nn.functional.linear(x, W_sparse), reps)  # noqa: B023
            t_plain_t = time_ms(lambda: W_sparse @ xT, reps)  # noqa: B023
            t_armor = time_ms(lambda: armor(x), reps)  # noqa: B023
        row = {
            "shape": [d_out, d_in],
            "tokens": n,
            "dense_ms": t_dense,
            "plain_2of4_ms": t_plain,
            "plain_2of4_transposed_ms": t_plain_t,
            "armor_ms": t_armor,
            "armor_speedup_vs_dense": t_dense / t_armor,
            "armor_over_plain_2of4": t_armor / t_plain,
            "dense_bytes": dense_bytes,
            "plain_2of4_bytes": plain_bytes,
            "armor_bytes": armor.weight_bytes(),
            "armor_bytes_over_dense": armor.weight_bytes() / dense_bytes,
        }
        print(
            f"  {d_out}x{d_in} N={n:5d}: dense {t_dense:.3f} ms, 2:4 {t_plain:.3f} ms (ᵀ {t_plain_t:.3f}), "
            f"ARMOR {t_armor:.3f} ms  -> {row['armor_speedup_vs_dense']:.2f}x dense, "
            f"{row['armor_over_plain_2of4']:.2f}x of 2:4",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_inference.py needs an NVIDIA GPU with CUDA; none is visible to torch here")
    if torch.cuda.get_device_capability(0) < (8, 0):
        sys.exit("2:4 semi-structured kernels need compute capability >= 8.0 (Ampere or newer)")
    report = {"machine": gpu_info(), "dtype": "float16", "block_size": BLOCK, "rows": []}
    for d_out, d_in in SHAPES:
        report["rows"].extend(run_shape(d_out, d_in, args.reps))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    big = [r for r in report["rows"] if r["tokens"] >= 2048]
    report["targets"] = {
        "armor_at_least_1.3x_dense_at_2048plus": all(r["armor_speedup_vs_dense"] >= 1.3 for r in big),
        "armor_within_1.15x_of_plain_2of4_at_2048plus": all(r["armor_over_plain_2of4"] <= 1.15 for r in big),
        "armor_weights_at_most_0.6x_dense": all(r["armor_bytes_over_dense"] <= 0.6 for r in report["rows"]),
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| shape | tokens | dense ms | 2:4 ms | ARMOR ms | ARMOR vs dense | ARMOR / 2:4 | bytes / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['tokens']} | {r['dense_ms']:.3f} | {r['plain_2of4_ms']:.3f} | "
            f"{r['armor_ms']:.3f} | {r['armor_speedup_vs_dense']:.2f}× | {r['armor_over_plain_2of4']:.2f} | "
            f"{r['armor_bytes_over_dense']:.3f} |"
        )
    print(json.dumps(report["targets"]))


if __name__ == "__main__":
    main()

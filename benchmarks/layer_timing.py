"""Wall-clock time of one ARMOR factorization per MiniLM layer shape, with default settings, on this machine.

The issue's target: every layer of all-MiniLM-L6-v2's size (384×384, 1536×384, 384×1536) factorized in under
a minute on 2 CPU cores, for both objectives. Run it on an otherwise idle machine (the load average before
and after is recorded, so a busy run shows itself)::

    python benchmarks/layer_timing.py

Writes ``benchmarks/results/layer_timing.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from make_demo_data import calibration_texts
from minilm_layers import CALIB_TOKENS, linear_inputs

from armor_ref.factorization import factorize
from armor_ref.objectives import gram_matrix

RESULTS = Path(__file__).resolve().parent / "results" / "layer_timing.json"
LAYERS = ("attention.self.query", "intermediate.dense", "output.dense")


def main() -> None:
    X, weights = linear_inputs(calibration_texts(), [2], CALIB_TOKENS, seed=0)
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "load_average_before": os.getloadavg(),
        "runs": [],
    }
    for short in LAYERS:
        name = f"encoder.layer.2.{short}"
        W, H = weights[name], gram_matrix(X[name])
        for proxy in ("nowag", "hessian"):
            wall, cpu = time.perf_counter(), time.process_time()
            result = factorize(W, H, proxy=proxy)
            run = {
                "layer": name,
                "shape": list(W.shape),
                "proxy": proxy,
                "sweeps": result.sweeps,
                "wall_seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu,
                "loss_ratio": result.loss / result.baseline_loss,
            }
            results["runs"].append(run)
            print(
                f"{short:22s} {str(tuple(W.shape)):12s} {proxy:8s} {run['wall_seconds']:6.1f} s wall  "
                f"{run['cpu_seconds']:6.1f} s cpu  loss ÷ baseline {run['loss_ratio']:.3f}",
                flush=True,
            )
    results["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

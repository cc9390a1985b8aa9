"""When should block coordinate descent stop? Per-sweep calibration loss and held-out output error on real
all-MiniLM-L6-v2 layers, for both objectives, and what each stopping rule would cost and gain (issue 9, item 6).

For every linear layer of the chosen encoder layers (default 0, 2, 5: all 18 linears, shapes 384×384, 1536×384,
384×1536), its real inputs are captured as in ``minilm_layers.py``: 8192 calibration tokens of
``pydoc_data.topics`` and 4096 held-out tokens of standard-library docstrings (a different source). Each layer is
then factorized by the fast path (NumPy, float64) with ``tol = 0`` for ``--cap`` sweeps, recording after every
sweep the proxy loss over the starting baseline's, the relative output error ``‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖²`` on the
calibration and on the held-out tokens, and the seconds so far (the error measurements themselves excluded).
The answers are those of ``factorize(..., sweeps=s, tol=0)`` for every ``s`` (the same random stream).

The old defaults are run beside them on the same code: 20 core-step CG iterations (``--old-cg``) and a fixed
30 nowag / 20 hessian sweeps (the stopping tolerance then never fired on real layers).

Then every rule "stop after the first sweep whose loss falls by no more than ``tol`` of the loss at its start,
or after ``cap`` sweeps" (spec §5.6) is read off the trajectories: sweeps run, time, calibration and held-out error
where it stops, against the old defaults. Run from the repository root (about 40 minutes on 2 idle cores; the
errors and sweep counts do not depend on the machine's load, the seconds do)::

    python benchmarks/stopping_rule.py --layers 0,2,5 --threads 1

Writes ``benchmarks/results/stopping_rule.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import calibration_texts, heldout_texts  # noqa: E402
from minilm_layers import CALIB_TOKENS, HELDOUT_TOKENS, linear_inputs  # noqa: E402

import backends.factorization as fast  # noqa: E402
from armor_ref.factorization import CORE_CG_ITERATIONS, DEFAULT_INIT, DEFAULT_SWEEPS, DEFAULT_TOL  # noqa: E402
from backends.baselines import run_baseline  # noqa: E402
from backends.objectives import make_problem, relative_output_error  # noqa: E402
from backends.threads import limit_threads  # noqa: E402
from toolkit.report import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stopping_rule.json"
PROXIES = ("nowag", "hessian")
TOLS = (1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 0.0)
CAPS = (20, 30, 40, 60)


def trajectory(W: np.ndarray, H_cal: np.ndarray, H_held: np.ndarray, proxy: str, sweeps: int, cg: int) -> list[dict]:
    """The state after every sweep of ``factorize(W, H_cal, proxy, sweeps=sweeps, tol=0)`` on the fast path, with
    ``cg`` core-step CG iterations: sweep, loss over the baseline's, calibration and held-out relative output error,
    wall and CPU seconds of the factorization up to that sweep (measuring excluded)."""
    core_step = functools.partial(fast.core_values_step, max_iter=cg)
    with mock.patch.object(fast, "core_values_step", core_step):
        measuring = [0.0, 0.0]  # wall, CPU seconds spent in record()
        t0, c0 = time.perf_counter(), time.process_time()
        problem = make_problem(W, H_cal, proxy)
        S0, M0 = run_baseline(DEFAULT_INIT[proxy], W, H_cal)
        f = fast.initial_factors(problem, S0, M0, fast.DEFAULT_BLOCK_SIZE)
        rows: list[dict] = []
        base = problem.loss(f.W_hat())

        def record(sweep: int, loss: float) -> None:
            w, c = time.perf_counter(), time.process_time()
            W_hat = problem.to_layer(f.W_hat())
            rows.append(
                {
                    "sweep": sweep,
                    "loss_ratio": loss / base,
                    "calib_error": relative_output_error(W, W_hat, H_cal),
                    "heldout_error": relative_output_error(W, W_hat, H_held),
                    "seconds": w - t0 - measuring[0],
                    "cpu_seconds": c - c0 - measuring[1],
                }
            )
            measuring[0] += time.perf_counter() - w
            measuring[1] += time.process_time() - c

        record(0, base)
        fast.run_bcd(problem, f, sweeps, 0.0, np.random.default_rng(0), on_sweep=record)
    return rows


def stop_at(rows: list[dict], tol: float, cap: int) -> dict:
    """The row where the rule (tol, cap) stops: the first sweep that gains ≤ tol of its starting loss, or ``cap``."""
    for prev, row in zip(rows, rows[1:], strict=False):
        if row["sweep"] >= cap or prev["loss_ratio"] - row["loss_ratio"] <= tol * prev["loss_ratio"]:
            return row
    return rows[-1]


def rule_table(report: dict) -> dict[str, list[dict]]:
    """Per proxy, every rule's mean sweeps, total seconds and mean errors where it stops, and their ratios to the
    old defaults' (time summed over the layers, errors averaged)."""
    out = {}
    for proxy in PROXIES:
        runs = [layer[proxy] for layer in report["layers"].values() if proxy in layer]
        if not runs:
            continue
        old = [run["old"][-1] for run in runs]
        old_seconds = sum(r["seconds"] for r in old)
        old_held = np.mean([r["heldout_error"] for r in old])
        old_calib = np.mean([r["calib_error"] for r in old])
        cap_max = max(len(run["new"]) - 1 for run in runs)
        rules = []
        for cap in [c for c in CAPS if c <= cap_max]:
            for tol in TOLS:
                stops = [stop_at(run["new"], tol, cap) for run in runs]
                seconds = sum(r["seconds"] for r in stops)
                held = float(np.mean([r["heldout_error"] for r in stops]))
                calib = float(np.mean([r["calib_error"] for r in stops]))
                rules.append(
                    {
                        "tol": tol,
                        "cap": cap,
                        "mean_sweeps": float(np.mean([r["sweep"] for r in stops])),
                        "max_sweeps": max(r["sweep"] for r in stops),
                        "seconds": seconds,
                        "seconds_over_old": seconds / old_seconds,
                        "calib_error": calib,
                        "calib_over_old": calib / old_calib,
                        "heldout_error": held,
                        "heldout_over_old": held / old_held,
                    }
                )
        out[proxy] = {"old_seconds": old_seconds, "old_calib": old_calib, "old_heldout": old_held, "rules": rules}
    return out


def markdown(report: dict) -> str:
    lines = []
    for proxy, table in report["rules"].items():
        lines += [
            f"\n{proxy}: old defaults (CG {report['old_cg']}, {DEFAULT_SWEEPS_OLD[proxy]} sweeps) "
            f"{table['old_seconds']:.0f} s in all, calib. error {table['old_calib']:.5f}, "
            f"held-out {table['old_heldout']:.5f} (means over {len(report['layers'])} layers)\n",
            "| tol | cap | mean sweeps | max | seconds | ÷ old | calib. error | ÷ old | held-out error | ÷ old |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table["rules"]:
            lines.append(
                f"| {r['tol']:g} | {r['cap']} | {r['mean_sweeps']:.1f} | {r['max_sweeps']} | {r['seconds']:.0f} "
                f"| {r['seconds_over_old']:.2f} | {r['calib_error']:.5f} | {r['calib_over_old']:.3f} "
                f"| {r['heldout_error']:.5f} | {r['heldout_over_old']:.3f} |"
            )
    return "\n".join(lines)


#: the fixed sweep counts before the stopping rule was chosen (commit 35fb0ed and earlier)
DEFAULT_SWEEPS_OLD = {"nowag": 30, "hessian": 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,2,5", help="encoder layers, comma-separated")
    parser.add_argument("--linears", default="", help="only linears whose name contains one of these (comma list)")
    parser.add_argument("--proxies", default=",".join(PROXIES))
    parser.add_argument("--cap", type=int, default=60, help="sweeps of each trajectory")
    parser.add_argument("--old-cg", type=int, default=20, help="CG iterations of the old defaults")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (1: timings comparable across loads)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table-only", action="store_true", help="print the tables of an existing --out file")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table_only:
        print(markdown(json.loads(out.read_text())))
        return
    layers = [int(x) for x in args.layers.split(",")]
    proxies = args.proxies.split(",")
    with limit_threads(args.threads):
        X_cal, weights = linear_inputs(calibration_texts(), layers, CALIB_TOKENS, 0)
        X_held, _ = linear_inputs(heldout_texts(), layers, HELDOUT_TOKENS, 1)
        names = [n for n in sorted(weights) if not args.linears or any(s in n for s in args.linears.split(","))]
        report = {
            "machine": machine_info(),
            "threads": args.threads,
            "load_average_before": list(os.getloadavg()),
            "calibration": f"{CALIB_TOKENS} tokens of pydoc_data.topics",
            "heldout": f"{HELDOUT_TOKENS} tokens of standard-library docstrings",
            "new_cg": CORE_CG_ITERATIONS,
            "old_cg": args.old_cg,
            "library_defaults_when_run": {"sweeps": DEFAULT_SWEEPS, "tol": DEFAULT_TOL},
            "layers": {},
        }
        for name in names:
            W, Xc, Xh = weights[name], X_cal[name], X_held[name]
            H_cal, H_held = Xc.T @ Xc, Xh.T @ Xh
            entry = report["layers"].setdefault(name, {"shape": list(W.shape)})
            for proxy in proxies:
                t0 = time.perf_counter()
                new = trajectory(W, H_cal, H_held, proxy, args.cap, CORE_CG_ITERATIONS)
                old = trajectory(W, H_cal, H_held, proxy, DEFAULT_SWEEPS_OLD[proxy], args.old_cg)
                entry[proxy] = {"new": new, "old": old, "load_average_after": list(os.getloadavg())}
                print(
                    f"{name} {proxy:7s} {time.perf_counter() - t0:5.0f} s: held-out {old[-1]['heldout_error']:.5f} "
                    f"(old, {old[-1]['sweep']} sweeps) → "
                    + " ".join(f"{r['sweep']}:{r['heldout_error']:.5f}" for r in new if r["sweep"] in CAPS),
                    flush=True,
                )
            report["rules"] = rule_table(report)
            report["load_average_after"] = list(os.getloadavg())
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
    print(markdown(report))


if __name__ == "__main__":
    main()

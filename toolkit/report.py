"""Reports: how a compressed layer compares with the 2:4 baselines, plain-text tables, and the machine a figure
was measured on.

The comparison of one layer (:func:`compare_with_baselines` then :func:`comparison_table`) is what ``armor-ref
factorize`` and ``armor-ref demo`` print and what ``benchmarks/minilm_layers.py`` records: for every method, the
proxy loss it is judged by, the nowag loss, the relative output error ``‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²`` on the
calibration data (and on held-out data when given), and seconds.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from backends.baselines import BASELINES, run_baseline
from backends.objectives import make_problem, nowag_loss, relative_output_error

from .errors import ArmorError

COLUMN_TITLES = {
    "proxy_loss": "{proxy} loss",
    "nowag_loss": "nowag loss",
    "calib_output_error": "calib out err",
    "heldout_output_error": "held-out err",
    "seconds": "seconds",
}


def finite(value: float, what: str) -> float:
    """``value`` if it is a finite number; otherwise :class:`ArmorError` naming ``what`` (NaN is never "0.0")."""
    if not math.isfinite(value):
        raise ArmorError(
            f"{what} is {value}", "check the weights and the calibration data for NaN/Inf, all-zero inputs or overflow"
        )
    return value


def output_error(W: np.ndarray, W_hat: np.ndarray, gram: np.ndarray, what: str) -> float:
    """The relative output error ``‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²`` (:func:`armor_ref.objectives.relative_output_error`),
    checked: it is undefined (NaN, an error here) when ``‖W Xᵀ‖² = 0`` — an all-zero weight or all-zero
    calibration inputs — whatever the reference returns for 0/0, and non-finite values are errors naming ``what``."""
    value = relative_output_error(W, W_hat, gram)
    if value == 0.0 and not float(np.sum((np.asarray(W, dtype=np.float64) @ gram) * W)) > 0:
        value = math.nan  # 0/0: W Xᵀ = 0, nothing to be relative to
    return finite(value, what)


def layer_metrics(
    W: np.ndarray, W_hat: np.ndarray, gram: np.ndarray, proxy: str, damping: float, heldout: np.ndarray | None = None
) -> dict[str, float]:
    """The losses and relative output errors of an approximation ``W_hat`` of ``W`` (calibration Gram ``gram``)."""
    problem = make_problem(W, gram, proxy, damping)
    metrics = {
        "proxy_loss": problem.loss(problem.to_target_space(W_hat)),
        "nowag_loss": nowag_loss(W, W_hat, np.diag(gram)),
        "calib_output_error": output_error(W, W_hat, gram, "calib output error"),
    }
    if heldout is not None:
        metrics["heldout_output_error"] = output_error(W, W_hat, heldout, "held-out output error")
    return {key: finite(value, key.replace("_", " ")) for key, value in metrics.items()}


def compare_with_baselines(
    W: np.ndarray, gram: np.ndarray, proxy: str, damping: float, heldout: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Every 2:4 baseline's :func:`layer_metrics` and seconds, by baseline name."""
    rows = {}
    for name in BASELINES:
        t0 = time.perf_counter()
        S, _ = run_baseline(name, W, gram)
        seconds = time.perf_counter() - t0
        rows[name] = {**layer_metrics(W, S, gram, proxy, damping, heldout), "seconds": seconds}
    return rows


def comparison_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], proxy: str = "") -> str:
    """One row per method (the keys of ``rows``), one column per metric in ``columns`` (keys of
    :data:`COLUMN_TITLES`); a metric a row lacks prints as ``-``."""
    titles = [COLUMN_TITLES[c].format(proxy=proxy) for c in columns]
    return format_table(
        ["method", *titles], [[name, *(row.get(c, "-") for c in columns)] for name, row in rows.items()]
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned, floats with 4 significant digits."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    return "\n".join("  " + line(values) for values in [list(map(str, headers)), *cells])


def machine_info() -> dict[str, Any]:
    """What a measured figure depends on: Python, CPU, load average, thread settings, library versions."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas_threads"] = {p.get("internal_api", "?"): p.get("num_threads") for p in threadpool_info()}
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------------
# Whole-model compression: the end-of-run table and the error-against-depth plot
# ----------------------------------------------------------------------------------------------------------
ERROR_PLOT = "armor_errors.png"


def linear_labels(names: Sequence[str]) -> dict[str, str]:
    """Short distinct column labels of the linears of a block: each name's shortest dotted suffix that no other
    name shares (``attention.self.query`` → ``query``; ``attention.output.dense`` and ``output.dense`` keep enough
    parts to stay apart)."""
    labels = {}
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(other != name and other.split(".")[-k:] == parts[-k:] for other in names):
                break
        labels[name] = suffix
    return labels


def _by_block(report: Mapping[str, Any]) -> tuple[list[str], dict[Any, dict[str, float]]]:
    """The linears of a block in compression order (relative names), and block -> {relative name: rel. error};
    the LM head (block ``None``) under its own name."""
    order: list[str] = []
    errors: dict[Any, dict[str, float]] = {}
    for layer in report["layers"]:
        block = layer["block"]
        rel = layer["name"].split(f".{block}.", 1)[-1] if block is not None else layer["name"]
        if rel not in order:
            order.append(rel)
        errors.setdefault(block, {})[rel] = layer["relative_output_error"]
    return order, errors


def compression_table(report: Mapping[str, Any]) -> str:
    """What `armor-ref compress` prints at the end: one row per block, the relative output error
    ``‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²`` of each of its linears on the calibration data, and the block's seconds; when
    blocks were refined, the refinement's block loss after ÷ before (``undone`` when it did not help)."""
    order, errors = _by_block(report)
    labels = linear_labels(order)
    seconds = {b["block"]: b["seconds"] for b in report["blocks"]}
    refined = {b["block"]: b["refine"] for b in report["blocks"] if "refine" in b}
    rows = []
    for block, values in errors.items():
        key = "lm_head" if block is None else block
        row = [*(values.get(rel, "-") for rel in order), seconds.get(key, "-")]
        if refined:
            refine = refined.get(key)
            row.append("-" if refine is None else "undone" if refine["reverted"] else _loss_ratio(refine))
        rows.append(["head" if block is None else block, *row])
    extra = ["refined loss ratio"] if refined else []
    return format_table(["block", *(labels[rel] for rel in order), "seconds", *extra], rows)


def _loss_ratio(refine: Mapping[str, Any]) -> float | str:
    before = refine["block_loss_before"]
    return refine["block_loss_after"] / before if before > 0 else "-"


def write_error_plot(out_dir: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """Plot every linear's relative output error against its block (depth), one line per kind of linear, as
    :data:`ERROR_PLOT` in ``out_dir`` (atomically). Returns ``{"error_plot": file name}``, or ``{"notes": [why
    not]}`` when matplotlib (the ``plot`` extra) is not installed: the plot is optional, never a failure."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return {"notes": [f"no {ERROR_PLOT}: matplotlib is not installed (pip install 'armor-ref[plot]')"]}
    from .files import atomic_write

    order, errors = _by_block(report)
    labels = linear_labels(order)
    blocks = sorted(b for b in errors if b is not None)
    head = errors.get(None, {})
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for rel in order:
        points = [(b, errors[b][rel]) for b in blocks if rel in errors[b]]
        if rel in head:
            points.append((len(blocks), head[rel]))
        x, y = zip(*points, strict=True)
        axes.plot(x, y, marker="o", markersize=3, linewidth=1, label=labels[rel])
    if all(v > 0 for values in errors.values() for v in values.values()):
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("block (depth)" + (f"; {len(blocks)} = LM head" if head else ""))
    axes.set_ylabel("relative output error ‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖²")
    settings = report.get("settings", {})
    axes.set_title(f"{report.get('architecture')}, {settings.get('method')}: per-linear error on the calibration data")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", ncol=min(len(order), 4))
    atomic_write(os.path.join(out_dir, ERROR_PLOT), lambda fh: figure.savefig(fh, format="png", dpi=110))
    return {"error_plot": ERROR_PLOT}

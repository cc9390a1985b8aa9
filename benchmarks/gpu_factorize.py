"""ARMOR factorization at LLM scale on one NVIDIA GPU (torch backend, float32), next to SparseGPT on the same GPU
(issue 10, items 3 and 5), and the memory model of a factorization.

Stages (each one Python run, each written into the same JSON, so they can be run one at a time):

* ``layers``: Llama-2-7B linears 4096×4096 (attention), 11008×4096 (MLP up/gate), 4096×11008 (MLP down);
  ``--shapes`` adds others (e.g. Llama-3-8B's 14336×4096). On the first shape also one sweep with the discrete
  step's position loop instead of the fused kernel (``ARMOR_FUSED_WALK=0``), for the kernel's speed-up on the GPU.
* ``block-attn``, ``block-mlp``: a whole Llama-2-7B-shaped decoder block, q, k, v, o (4096×4096) and gate, up
  (11008×4096), down (4096×11008), each with the Gram matrix of its own input (q/k/v share one, gate/up another).
* ``memory``: the memory model (below) against the peak traced by ``tracemalloc`` on the NumPy path in float32 at
  small shapes (the same code as torch's, written once over an array namespace), and its predicted peaks at the
  Llama shapes; CPU only, writes ``benchmarks/results/memory_model_cpu.json``.

Calibration: 128 sequences × 2048 tokens of **synthetic** LLM-like activations, generated on the GPU (nothing is
downloaded): a low-rank shared component plus noise, log-normal channel scales and a few outlier channels 20-100×
larger (the massive-activation channels of real LLMs); weights Gaussian with log-normal row scales. For timing and
memory, not for quality claims.

For every layer: SparseGPT's time (torch, same GPU, the operands already there); then the fast path's ``factorize``
at default settings (hessian proxy, SparseGPT start, the stopping rule of 0.5 % per sweep with a cap of 40 sweeps,
block 32, float32 on CUDA) with the time of every sweep and of every step (A, B, core values, discrete:
CUDA-synchronised around each step), the time to the default-settings loss (the run's end, the transfer of ``W`` and
the Gram matrix included) and to within 1 % of it, the fused kernel's launches, and the peak GPU memory
(``torch.cuda.max_memory_allocated``) next to the memory model's prediction. The JSON records the GPU model, driver,
torch / CUDA / Triton versions and the issue's targets next to the figures. ``benchmarks/run_gpu.sh`` runs every
stage::

    python benchmarks/gpu_factorize.py layers                 # GPU
    python benchmarks/gpu_factorize.py block-attn             # GPU
    python benchmarks/gpu_factorize.py block-mlp              # GPU
    python benchmarks/gpu_factorize.py memory                 # CPU
    python benchmarks/gpu_factorize.py layers --smoke         # tiny shapes on the CPU (float64; the fused walk
                                                              # interpreted when TRITON_INTERPRET=1 ARMOR_FUSED_WALK=1)

Memory model (:func:`memory_model`; ``m × n`` the layer, ``b`` the block size, ``s`` bytes per working float):
the arrays that live through the sweeps, ``(5s + 2)·mn + 2s·n² + 2s·(m+n)·b`` — ``W`` (the target ``T``),
``T H``, ``T F``, the core ``S``, run_bcd's undo copy of ``S`` (``s·mn`` each), the mask and its copy (bool),
``H`` and its Cholesky factor ``F`` (``s·n²`` each), ``A``, ``B`` and their copies — plus the largest step's
temporaries. The core-values step's are the largest for ``b ≥ 8``: ``6·P + 3.2·mn + n²`` floats, ``P = mn·b/4`` the
entries of its block-Jacobi preconditioner (``m·n/b`` blocks of ``b/2 × b/2``: the gathered ``C`` blocks, ``P``,
``ridge·I``, ``P + ridge·I`` and ``linalg.inv``'s work and result), then the CG vectors. Before the sweeps, the
SparseGPT start holds ``4s·mn + 10s·n²``. The coefficients are read off ``tracemalloc`` on the NumPy path (stage
``memory``) and explained by the arrays named; on the GPU each layer's JSON row has measured / predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from armor_ref.factorization import DEFAULT_BLOCK_SIZE
from backends import factorization as fast
from backends import get_factorize
from backends.baselines import prune_sparsegpt
from toolkit.files import write_json
from toolkit.report import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SEQUENCES, SEQLEN = 128, 2048
HIDDEN, INTERMEDIATE = 4096, 11008
#: the Llama-2-7B decoder block: (name, d_out, d_in, input); layers with the same input share one Gram matrix
BLOCK_LAYERS = {
    "block-attn": [
        ("q_proj", "h", "h", "attention input"),
        ("k_proj", "h", "h", "attention input"),
        ("v_proj", "h", "h", "attention input"),
        ("o_proj", "h", "h", "attention output"),
    ],
    "block-mlp": [
        ("gate_proj", "i", "h", "MLP input"),
        ("up_proj", "i", "h", "MLP input"),
        ("down_proj", "h", "i", "MLP hidden"),
    ],
}
#: --smoke: the same code at tiny sizes on the CPU
SMOKE = {"shapes": [(64, 128)], "hidden": 64, "intermediate": 128, "tokens": 512, "sweeps": 2}
TARGETS = {
    "4096x11008_seconds_to_default_loss_at_most": 30,
    "4096x11008_peak_gb_at_most": 20,
    "llama2_7b_block_seconds_at_most": 180,
    "armor_over_sparsegpt_seconds_at_most": 10,
    "source": "issue 10 (one H100, hessian objective, default settings, float32)",
}
STEPS = ("a_step", "b_step", "core_values_step", "discrete_step")


# ----------------------------------------------------------------------------------------------------------------
# The memory model
# ----------------------------------------------------------------------------------------------------------------
def memory_model(d_out: int, d_in: int, b: int = DEFAULT_BLOCK_SIZE, itemsize: int = 4) -> dict:
    """Bytes of the arrays a hessian ``factorize`` holds on its device (module docstring): ``persistent`` (through
    the sweeps, by array), each phase's ``transient`` on top of what lives then, and the ``peak`` (its phase)."""
    m, n, s = d_out, d_in, itemsize
    mn, nn, P = m * n, n * n, m * n * b // 4
    persistent = {
        "W (the target T)": s * mn,
        "T H": s * mn,
        "T F": s * mn,
        "S (core)": s * mn,
        "copy of S (undo)": s * mn,
        "M and its copy (bool)": 2 * mn,
        "H (damped Gram)": s * nn,
        "F (Cholesky factor of H)": s * nn,
        "A, B and their copies": 2 * s * (m + n) * b,
    }
    held = sum(persistent.values())
    transient = {  # the largest extra of each phase, on top of what lives then (tracemalloc, NumPy path)
        "SparseGPT start (W, Gram, H, F, T H, T F held)": s * (4 * mn + 10 * nn),
        "loss": held + s * 2 * mn,
        "A-step": held + s * 2 * mn + 8 * 3 * mn,  # pseudo-inverse by SVD in float64
        "B-step": held + s * 2 * mn + 8 * 2 * mn,
        "core-values step": held + s * (6 * P + 3.2 * mn + nn),
        "discrete step": held + s * 13.5 * mn,
    }
    phase = max(transient, key=transient.get)
    return {
        "shape": [d_out, d_in],
        "block_size": b,
        "itemsize": s,
        "persistent_bytes": persistent,
        "persistent_total_bytes": held,
        "phase_peak_bytes": {k: int(v) for k, v in transient.items()},
        "peak_bytes": int(transient[phase]),
        "peak_phase": phase,
    }


def memory_check_cpu(cases: list[tuple[int, int, int]]) -> list[dict]:
    """The model against ``tracemalloc``'s peak of a one-sweep NumPy float32 ``factorize`` (whole call) per case
    ``(d_out, d_in, b)``. NumPy reports its allocations to tracemalloc; LAPACK's work buffers are not seen."""
    rows = []
    factorize = get_factorize("numpy", "cpu")
    for d_out, d_in, b in cases:
        W, gram = synthetic_weight(d_out, d_in), synthetic_gram(d_in, 4 * d_in, torch.device("cpu")).numpy()
        tracemalloc.start()
        try:
            start, _ = tracemalloc.get_traced_memory()
            factorize(W, gram, proxy="hessian", block_size=b, sweeps=1, tol=0.0, dtype="float32", threads=1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        predicted = memory_model(d_out, d_in, b)
        rows.append(
            {
                "shape": [d_out, d_in],
                "block_size": b,
                "measured_peak_bytes": peak - start,
                "predicted_peak_bytes": predicted["peak_bytes"],
                "measured_over_predicted": (peak - start) / predicted["peak_bytes"],
                "predicted_phase": predicted["peak_phase"],
            }
        )
        traced, model = fmt_gb(peak - start), fmt_gb(predicted["peak_bytes"])
        print(f"  {d_out}x{d_in} b={b}: traced {traced}, model {model} ({rows[-1]['measured_over_predicted']:.3f})")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Synthetic layers, machine, timing
# ----------------------------------------------------------------------------------------------------------------
def synthetic_gram(d_in: int, tokens: int, device: torch.device, seed: int = 0, chunk: int = 8192) -> torch.Tensor:
    """``XᵀX`` (float64, on the CPU) of ``tokens`` synthetic LLM-like activation rows, accumulated chunk by chunk on
    ``device``: ``X = Z U + ε``, scaled per channel (log-normal), ~0.5 % outlier channels ×20-100."""
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


def gpu_machine() -> dict:
    """GPU model, driver, torch / CUDA / Triton versions (the CPU's description otherwise)."""
    info = machine_info()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    info["fused_walk_env"] = os.environ.get(fast.FUSED_WALK_ENV)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": list(torch.cuda.get_device_capability(0)),
            "driver": driver,
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timed_steps(device: torch.device, seconds: dict[str, list[float]]) -> Iterator[None]:
    """Time every call of the fast path's four steps (synchronised on CUDA), appended to ``seconds[step]``."""
    originals = {name: getattr(fast, name) for name in STEPS}

    def timed(name: str, step: Callable) -> Callable:
        def run(*args: Any) -> Any:
            sync(device)
            t0 = time.perf_counter()
            out = step(*args)
            sync(device)
            seconds.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return run

    for name, step in originals.items():
        setattr(fast, name, timed(name, step))
    try:
        yield
    finally:
        for name, step in originals.items():
            setattr(fast, name, step)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------------------
def launches() -> int:
    """Launches of the fused walk so far (0 where triton is missing)."""
    try:
        from backends.torch.discrete_kernel import LAUNCHES
    except ImportError:
        return 0
    return LAUNCHES["walk_column_block"]


def factorize_layer(W: np.ndarray, gram: np.ndarray, device: torch.device, dtype: str, sweeps: int | None) -> dict:
    """One default-settings hessian factorization on ``device``: times, step times, launches, peak memory."""
    stamps: list[tuple[int, float, float]] = []
    step_seconds: dict[str, list[float]] = {}
    reset_peak(device)
    launched = launches()
    with timed_steps(device, step_seconds):
        t0 = time.perf_counter()

        def on_sweep(sweep: int, loss: float) -> None:
            stamps.append((sweep, time.perf_counter() - t0, loss))
            print(f"    sweep {sweep:3d}  {stamps[-1][1]:8.1f} s  loss {loss:.6g}", flush=True)

        result = get_factorize("torch", str(device))(W, gram, proxy="hessian", sweeps=sweeps, dtype=dtype,
                                                     on_sweep=on_sweep)  # fmt: skip
        sync(device)
        seconds = time.perf_counter() - t0
    within = next((t for _, t, loss in stamps if loss <= result.loss * 1.01), seconds)
    return {
        "seconds_to_default_loss": seconds,
        "seconds_to_within_1pct_of_default_loss": within,
        "seconds_per_sweep": np.diff([0.0] + [t for _, t, _ in stamps]).tolist(),
        "step_seconds_total": {name: float(sum(v)) for name, v in step_seconds.items()},
        "fused_walk_launches": launches() - launched,
        "peak_bytes": peak_bytes(device),
        "sweeps": result.sweeps,
        "baseline_loss": result.baseline_loss,
        "loss": result.loss,
        "loss_over_sparsegpt": result.loss / result.baseline_loss,
        "reverted_steps": sum(bool(e.get("reverted")) for e in result.trace),
        "trace": [{"sweep": s, "seconds": t, "loss": loss} for s, t, loss in stamps],
    }


def run_layer(W: np.ndarray, gram: torch.Tensor, device: torch.device, dtype: str, sweeps: int | None,
              compare_loop: bool = False) -> dict:  # fmt: skip
    d_out, d_in = W.shape
    work = getattr(torch, dtype)
    W_t, gram_t = torch.from_numpy(W).to(device, work), gram.to(device, work)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        prune_sparsegpt(W_t, gram_t)
    sync(device)
    sparsegpt_seconds = time.perf_counter() - t0
    sparsegpt_peak = peak_bytes(device)
    del W_t, gram_t

    armor = factorize_layer(W, gram.numpy(), device, dtype, sweeps)
    model = memory_model(d_out, d_in, itemsize=torch.finfo(work).bits // 8)
    row = {
        "shape": [d_out, d_in],
        "column_blocks": d_in // DEFAULT_BLOCK_SIZE,
        "sparsegpt_seconds": sparsegpt_seconds,
        "sparsegpt_peak_bytes": sparsegpt_peak,
        "armor": armor,
        "armor_over_sparsegpt_seconds": armor["seconds_to_default_loss"] / sparsegpt_seconds,
        "predicted_peak_bytes": model["peak_bytes"],
        "predicted_peak_phase": model["peak_phase"],
        "measured_over_predicted_peak": None if armor["peak_bytes"] is None
        else armor["peak_bytes"] / model["peak_bytes"],
    }  # fmt: skip
    if compare_loop:  # one sweep with each walk, from the same start: the discrete step's time
        one = {}
        for label in ("fused", "loop"):
            print(f"    one sweep, discrete walk: {label}", flush=True)
            with walk_env("0" if label == "loop" else os.environ.get(fast.FUSED_WALK_ENV)):
                one[label] = factorize_layer(W, gram.numpy(), device, dtype, 1)["step_seconds_total"]
        row["one_sweep_step_seconds"] = one
        row["discrete_step_speedup_fused_over_loop"] = one["loop"]["discrete_step"] / one["fused"]["discrete_step"]
    print(
        f"  SparseGPT {sparsegpt_seconds:.1f} s; ARMOR {armor['seconds_to_default_loss']:.1f} s (1 % of the default "
        f"loss at {armor['seconds_to_within_1pct_of_default_loss']:.1f} s), steps "
        + ", ".join(f"{k} {v:.1f} s" for k, v in armor["step_seconds_total"].items())
        + f"; peak {fmt_gb(armor['peak_bytes'])} (model {fmt_gb(model['peak_bytes'])}); "
        f"loss/SparseGPT {armor['loss_over_sparsegpt']:.3f}",
        flush=True,
    )
    return row


@contextmanager
def walk_env(value: str | None) -> Iterator[None]:
    """``ARMOR_FUSED_WALK`` set to ``value`` (unset for None) inside the block, restored after."""

    def put(v: str | None) -> None:
        if v is None:
            os.environ.pop(fast.FUSED_WALK_ENV, None)
        else:
            os.environ[fast.FUSED_WALK_ENV] = v

    saved = os.environ.get(fast.FUSED_WALK_ENV)
    put(value)
    try:
        yield
    finally:
        put(saved)


def fmt_gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------
def stage_layers(shapes: list[tuple[int, int]], tokens: int, device: torch.device, dtype: str, sweeps: int | None,
                 save: Callable[[str, list[dict]], None], compare_loop: bool) -> None:  # fmt: skip
    rows = []
    for index, (d_out, d_in) in enumerate(shapes):
        print(f"{d_out}x{d_in} hessian", flush=True)
        gram = synthetic_gram(d_in, tokens, device)
        rows.append(run_layer(synthetic_weight(d_out, d_in), gram, device, dtype, sweeps, compare_loop and index == 0))
        save("layers", rows)


def stage_block(part: str, hidden: int, intermediate: int, tokens: int, device: torch.device, dtype: str,
                sweeps: int | None, save: Callable[[str, list[dict]], None]) -> None:  # fmt: skip
    dims = {"h": hidden, "i": intermediate}
    sources = [source for layers in BLOCK_LAYERS.values() for *_, source in layers]
    grams: dict[str, torch.Tensor] = {}
    rows = []
    for name, o, i, source in BLOCK_LAYERS[part]:
        if source not in grams:  # the same seed for the same input, whichever part runs
            grams[source] = synthetic_gram(dims[i], tokens, device, seed=10 + sources.index(source))
        print(f"block {name} {dims[o]}x{dims[i]} ({source})", flush=True)
        seed = 20 + [n for layers in BLOCK_LAYERS.values() for n, *_ in layers].index(name)
        row = run_layer(synthetic_weight(dims[o], dims[i], seed=seed), grams[source], device, dtype, sweeps)
        rows.append({"name": name, "input": source, **row})
        save(part, rows)


def row_id(row: dict) -> tuple:
    """What a result row is of: its block layer name, or its shape."""
    return (row.get("name"), tuple(row["shape"]))


def block_totals(report: dict) -> dict | None:
    """The whole block's seconds once both parts are in the report."""
    parts = [report.get(part) for part in BLOCK_LAYERS]
    if not all(parts):
        return None
    rows = [r for part in parts for r in part]
    return {
        "layers": [r["name"] for r in rows],
        "armor_seconds": sum(r["armor"]["seconds_to_default_loss"] for r in rows),
        "sparsegpt_seconds": sum(r["sparsegpt_seconds"] for r in rows),
        "armor_peak_bytes": max((r["armor"]["peak_bytes"] or 0) for r in rows),
    }


def targets_met(report: dict) -> dict:
    """The issue's targets against what was measured (None where not measured)."""
    big = next((r for r in report.get("layers", []) if r["shape"] == [4096, 11008]), None)
    block = report.get("llama2_7b_block")
    rows = report.get("layers", []) + [r for part in BLOCK_LAYERS for r in report.get(part, [])]
    return {
        "4096x11008_seconds": None if big is None else big["armor"]["seconds_to_default_loss"] <= 30,
        "4096x11008_peak": None if big is None else big["armor"]["peak_bytes"] <= 20e9,
        "llama2_7b_block_seconds": None if block is None else block["armor_seconds"] <= 180,
        "within_10x_of_sparsegpt": all(r["armor_over_sparsegpt_seconds"] <= 10 for r in rows) if rows else None,
    }


def print_table(report: dict) -> None:
    print("| layer | SparseGPT s | ARMOR s | within 1 % s | A/B/core/discrete s | launches | peak GB (model) "
          "| loss / SparseGPT |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    named = [("", r) for r in report.get("layers", [])]
    named += [(r["name"] + " ", r) for part in BLOCK_LAYERS for r in report.get(part, [])]
    for name, r in named:
        a = r["armor"]
        steps = "/".join(f"{a['step_seconds_total'].get(s, 0):.1f}" for s in STEPS)
        print(
            f"| {name}{r['shape'][0]}×{r['shape'][1]} | {r['sparsegpt_seconds']:.1f} | "
            f"{a['seconds_to_default_loss']:.1f} | {a['seconds_to_within_1pct_of_default_loss']:.1f} | {steps} | "
            f"{a['fused_walk_launches']} | {fmt_gb(a['peak_bytes'])} ({fmt_gb(r['predicted_peak_bytes'])}) | "
            f"{a['loss_over_sparsegpt']:.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["layers", *BLOCK_LAYERS, "memory"])
    parser.add_argument("--shapes", default=None, help="layers: comma-separated d_outxd_in (default: Llama-2's)")
    parser.add_argument(
        "--sweeps",
        type=int,
        default=None,
        help="the sweep cap [default: the library's stopping rule, tol 0.5 %%, cap 40]",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in float64")
    parser.add_argument("--no-loop-comparison", action="store_true", help="layers: skip the one-sweep loop run")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/gpu_factorize.json")
    args = parser.parse_args()

    if args.stage == "memory":
        torch.set_num_threads(1)
        cases = [(384, 1536, 32), (1536, 384, 16), (640, 1280, 64), (1024, 1024, 32), (768, 768, 8)]
        report = {"machine": machine_info(), "what": "memory_model() against tracemalloc, NumPy float32, 1 sweep",
                  "cases": memory_check_cpu(cases),
                  "predicted_float32_b32": [memory_model(o, i) for o, i in [*SHAPES, (14336, 4096)]]}  # fmt: skip
        for p in report["predicted_float32_b32"]:
            print(f"  predicted {p['shape'][0]}x{p['shape'][1]}: peak {fmt_gb(p['peak_bytes'])} in the "
                  f"{p['peak_phase']}, persistent {fmt_gb(p['persistent_total_bytes'])}")  # fmt: skip
        write_json(Path(args.out or RESULTS / "memory_model_cpu.json"), report)
        return

    if args.smoke:
        torch.set_num_threads(1)
        device, dtype = torch.device("cpu"), "float64"
        shapes, hidden, intermediate = SMOKE["shapes"], SMOKE["hidden"], SMOKE["intermediate"]
        tokens, sweeps = SMOKE["tokens"], args.sweeps or SMOKE["sweeps"]
        out = Path(args.out or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_factorize_smoke.json")
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_factorize.py needs an NVIDIA GPU with CUDA; none is visible to torch here (try --smoke)")
        device, dtype = torch.device("cuda"), "float32"
        shapes, hidden, intermediate = SHAPES, HIDDEN, INTERMEDIATE
        tokens, sweeps = SEQUENCES * SEQLEN, args.sweeps
        out = Path(args.out or RESULTS / "gpu_factorize.json")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    report = json.loads(out.read_text()) if out.exists() else {}  # stages add to what earlier stages wrote
    report |= {
        "calibration": f"{tokens} synthetic LLM-like tokens (outlier channels)",
        "weights": "synthetic Gaussian, log-normal row scales",
        "dtype": dtype,
        "smoke": args.smoke,
        "targets": TARGETS,
    }
    report.setdefault("machine", {})[args.stage] = gpu_machine()

    def save(key: str, rows: list[dict]) -> None:  # rows run now replace earlier rows of the same layer
        ids = {row_id(r) for r in rows}
        report[key] = [r for r in report.get(key, []) if row_id(r) not in ids] + rows
        report["llama2_7b_block"] = block_totals(report)
        report["targets_met"] = "not applicable (--smoke)" if args.smoke else targets_met(report)
        write_json(out, report)

    t0 = time.perf_counter()
    if args.stage == "layers":
        stage_layers(shapes, tokens, device, dtype, sweeps, save, compare_loop=not args.no_loop_comparison)
    else:
        stage_block(args.stage, hidden, intermediate, tokens, device, dtype, sweeps, save)
    report["machine"][args.stage]["stage_seconds"] = time.perf_counter() - t0
    report["machine"][args.stage]["load_average_after"] = list(os.getloadavg())
    write_json(out, report)
    print_table(report)
    if report["llama2_7b_block"]:
        block = report["llama2_7b_block"]
        print(f"whole block: ARMOR {block['armor_seconds']:.1f} s, SparseGPT {block['sparsegpt_seconds']:.1f} s")
    print(json.dumps(report["targets_met"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

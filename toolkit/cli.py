"""The ``armor-ref`` command line: factorize, prune, inspect, reconstruct, demo (and, from :mod:`toolkit.cli_model`,
compress and eval).

Every problem the user can act on is raised as :class:`~toolkit.errors.ArmorError` anywhere below and caught in one
place, :meth:`ArmorGroup.invoke`, which prints ``error: <problem>; <fix>`` on one line of stderr and exits with the
error's code (:mod:`toolkit.errors`). All checks run before anything is written, and files are written atomically,
so a failed command leaves no output file behind and never touches its inputs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import click
import numpy as np

from armor_ref.factorization import (
    BUDGET_HELP,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_INIT,
    DEFAULT_SWEEPS,
    DEFAULT_TOL,
    SCHEDULES,
    check_shapes,
)
from armor_ref.masks import GROUP, has_two_per_group, is_2of4
from armor_ref.objectives import DEFAULT_DAMPING, PROXIES
from backends import BACKENDS, BackendUnavailable, get_factorize
from backends.baselines import BASELINES, run_baseline
from backends.objectives import nowag_loss

from .armor_format import (
    ARMOR_FORMAT,
    ARMOR_SUFFIXES,
    LOWRANK_SUFFIXES,
    ArmorFile,
    ArmorLayer,
    dense_tensor_name,
    load_armor,
    save_armor,
)
from .calibration import load_calibration, load_calibrations
from .cli_model import register_model_commands, threads_option
from .errors import EXIT_CODES_HELP, EXIT_FAILURE, ArmorError, os_error_message
from .files import read_safetensors, read_safetensors_header, write_json, write_safetensors
from .manifest import verify_file, verify_run
from .models import armor_quantization, read_config, weight_files
from .report import compare_with_baselines, comparison_table, format_table, layer_metrics, output_error

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_WEIGHTS = DATA_DIR / "minilm_qkv.safetensors"
DEMO_CALIB = DATA_DIR / "minilm_calib.npy"
DEMO_HELDOUT = DATA_DIR / "minilm_heldout.npy"
DEMO_SWEEPS = {"nowag": 8, "hessian": 4}  # small budgets, a few seconds of CPU time (see `armor-ref demo --help`)
BACKEND_HELP = "numpy: the fast path on the CPU; torch: cpu or cuda; cupy: cuda; reference: the plain reference (slow)."
DEMO_COLUMNS = """Columns of the tables above (rows: the four 2:4 baselines, then ARMOR with each objective and its
sweep budget, sw):
  nowag loss     the paper's proxy loss, sum_ij h_j (W_ij - Ŵ_ij)² on row/column-normalised weights, h_j the
                 squared norm of input channel j on the calibration tokens
  calib out err  the relative output error |(W - Ŵ) Xᵀ|² / |W Xᵀ|² on the calibration tokens X
  held-out err   the same on the held-out tokens (text the methods never saw)
  seconds        the method's time on this tensor
"""


class ArmorGroup(click.Group):
    """A click group that turns every :class:`ArmorError`, an ``OSError`` from the disk and click's own usage errors
    (missing or out-of-range options) into one line on stderr and the error's exit code, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ArmorError as err:
            message, code = str(err), err.exit_code
        except OSError as err:  # unreadable input, unwritable output, full disk, ...
            message, code = f"{os_error_message(err)}; check the path, its permissions and the free space", EXIT_FAILURE
        except click.ClickException as err:  # usage errors: exit 2, like every input error
            command = err.ctx.command_path if isinstance(err, click.UsageError) and err.ctx else ctx.command_path
            message, code = f"{err.format_message().rstrip('.')}; see {command} --help", err.exit_code
        click.echo("error: " + " ".join(message.split()), err=True)
        ctx.exit(code)


@click.group(cls=ArmorGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
def cli() -> None:
    """ARMOR: compress linear layers to 2:4 sparsity as W ≈ blockdiag(A) · S · blockdiag(B).

    S is a 2:4 sparse core (2 of every 4 weights kept), A and B are block-diagonal matrices of small b×b
    blocks that recover much of the accuracy plain 2:4 pruning loses.

    \b
    Try it on the bundled example (one all-MiniLM-L6-v2 layer):
        armor-ref demo
    Factorize your own weights with calibration activations:
        armor-ref factorize model.safetensors --calib acts.npy
        armor-ref inspect model.armor.safetensors
    """


# the whole-model commands `armor-ref compress` and `armor-ref eval` live in armor_ref/cli_model.py, beside the
# model code (which imports torch only when they run)
register_model_commands(cli)


def main() -> None:
    """Console-script entry point (``armor-ref``)."""
    cli(prog_name="armor-ref")


# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------
def sibling_path(path: Path, suffix: str) -> Path:
    """``model.safetensors`` -> ``model<suffix>`` in the same directory."""
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(stem + suffix)


def finite_non_negative(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Click callback: a finite number ≥ 0 (``nan`` and ``inf`` parse as floats but mean nothing here)."""
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a finite number >= 0", ctx, param)
    return value


def check_output_path(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse to write over one of the inputs."""
    for source in inputs:
        if os.path.realpath(output) == os.path.realpath(source):
            raise ArmorError(f"output {output} is the input file {source}", "choose another -o path")


def is_explicit(pattern: str) -> bool:
    """A --tensors pattern without wildcards names one tensor exactly."""
    return not any(ch in pattern for ch in "*?[")


def select_matrices(weights: Mapping[str, np.ndarray], patterns: Sequence[str], notes: list[str]) -> list[str]:
    """Names of the 2-D floating-point tensors matching ``patterns`` (fnmatch globs). A tensor named explicitly
    must exist and be 2-D; others that are not 2-D are skipped with a note."""
    explicit = {p for p in patterns if is_explicit(p)}
    for name in sorted(explicit):
        if name not in weights:
            raise ArmorError(f"no tensor named {name!r} in the weights file", "armor-ref inspect FILE lists them")
    selected, skipped = [], []
    for name, array in weights.items():
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if array.ndim != 2 or array.dtype.kind != "f":
            if name in explicit:
                raise ArmorError(
                    f"tensor {name!r} has shape {array.shape} and dtype {array.dtype}, not a 2-D float matrix",
                    "select weight matrices with --tensors",
                )
            skipped.append(name)
            continue
        selected.append(name)
    if skipped:
        notes.append(f"{len(skipped)} tensor(s) that are not 2-D float matrices are copied through unchanged")
    if not selected:
        raise ArmorError(
            f"nothing to factorize: no 2-D tensor matches --tensors {' '.join(patterns)}",
            "armor-ref inspect FILE lists the tensors",
        )
    return selected


def calibrated_layers(
    weights: Mapping[str, np.ndarray], patterns: Sequence[str], calib: Sequence[Path], notes: list[str]
) -> tuple[list[str], dict[str, tuple[np.ndarray, int | None]]]:
    """The selected 2-D tensors with their Gram matrices from the ``calib`` files (merged); checks every input.
    Every selected tensor must have calibration: one that has none is an error naming it (leave it out with
    ``--tensors``), never a silent skip."""
    selected = select_matrices(weights, patterns, notes)
    grams = load_calibrations(calib, {name: weights[name] for name in selected})
    lacking = [name for name in selected if name not in grams]
    if lacking:
        shown = ", ".join(f"{name} {'x'.join(map(str, weights[name].shape))}" for name in lacking[:3])
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise ArmorError(
            f"no calibration for {len(lacking)} of the {len(selected)} selected tensor(s): {shown}{more}",
            "give their input activations (N, d_in) with another --calib, or leave them out with --tensors",
        )
    for name in selected:
        if not np.all(np.isfinite(weights[name])):
            raise ArmorError(f"tensor {name!r} contains NaN or Inf values", "fix the weights before compressing")
    return selected, grams


def load_heldout(
    heldout: Path | None, tensors: Mapping[str, np.ndarray], layers: Sequence[str]
) -> dict[str, tuple[np.ndarray, int | None]]:
    """Held-out Gram matrices for every layer to factorize ({} without --heldout)."""
    if heldout is None:
        return {}
    grams = load_calibration(heldout, {name: tensors[name] for name in layers})
    for name in layers:
        if name not in grams:
            raise ArmorError(
                f"held-out data {heldout} has nothing for tensor {name!r}",
                "give held-out activations for every tensor that has calibration",
            )
    return grams


def check_factorizable(name: str, shape: tuple[int, ...], block_size: int) -> None:
    """Dimensions must split into groups of 4 and into blocks of ``block_size``."""
    try:
        check_shapes(shape[0], shape[1], block_size)
    except ValueError as err:
        raise ArmorError(
            f"tensor {name!r} {tuple(shape)}: {err}",
            "choose --block-size dividing both dimensions, or leave the tensor out with --tensors",
        ) from None


def run_with_progress(factorize_fn: Callable, label: str, budget: int, W: np.ndarray, gram: np.ndarray, **options):
    """Run ``factorize_fn`` with a progress bar on stderr advanced once per sweep."""
    with click.progressbar(length=budget, label=label, file=sys.stderr) as bar:
        result = factorize_fn(W, gram, sweeps=budget, on_sweep=lambda sweep, loss: bar.update(1), **options)
        bar.update(max(0, budget - result.sweeps))
    return result


@contextlib.contextmanager
def numerical_failures(name: str) -> Iterator[None]:
    """Turn a linear-algebra failure inside the block into a one-line error naming tensor ``name``."""
    try:
        yield
    except np.linalg.LinAlgError as err:
        raise ArmorError(
            f"tensor {name!r}: the computation failed numerically ({err})",
            "check the weights and the calibration data for extreme values",
        ) from None


def resolve_factorize(backend: str, device: str) -> Callable:
    """The backend's ``factorize``; an unavailable backend or device is an input error (its own advice kept)."""
    try:
        return get_factorize(backend, device)
    except BackendUnavailable as err:
        problem, _, fix = str(err).partition("; ")
        raise ArmorError(problem, fix or "choose an available backend, e.g. --backend numpy --device cpu") from None


# ----------------------------------------------------------------------------------------------------------
# factorize
# ----------------------------------------------------------------------------------------------------------
@cli.command()
@threads_option
@click.argument("weights", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--calib",
    "calib",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Calibration: .npy activations (N, d_in) for every tensor of that input width, or .npz / "
    ".safetensors keyed by tensor name (NAME = activations, NAME.gram = XᵀX). Repeat to merge files (e.g. one "
    ".npy per input width); each tensor takes its calibration from exactly one file, and every selected tensor "
    "needs some.",
)
@click.option(
    "--heldout",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Optional held-out activations, same formats as --calib, to report output error on unseen data.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file [default: WEIGHTS with .armor.safetensors, next to it].",
)
@click.option(
    "--proxy",
    type=click.Choice(PROXIES),
    default="nowag",
    show_default=True,
    help="Loss to minimise: nowag (the paper's diagonal proxy) or hessian (the layer's output error "
    "on the calibration data).",
)
@click.option(
    "--init",
    type=click.Choice(BASELINES),
    default=None,
    help="Baseline to start from [default: nowag-p for nowag, sparsegpt for hessian].",
)
@click.option(
    "--block-size",
    type=int,
    default=DEFAULT_BLOCK_SIZE,
    show_default=True,
    help="Size b of the diagonal blocks of A and B; a multiple of 4 dividing both dimensions.",
)
@click.option(
    "--sweeps",
    type=click.IntRange(min=0),
    default=None,
    help=f"Sweep cap [default: {BUDGET_HELP} (--tol)]; iterations for --schedule adam.",
)
@click.option(
    "--tol",
    type=float,
    default=DEFAULT_TOL,
    show_default=True,
    callback=finite_non_negative,
    help="Stop after the first sweep that lowers the loss by no more than this fraction of it (>= 0; 0: run "
    "all --sweeps).",
)
@click.option(
    "--damping",
    type=float,
    default=DEFAULT_DAMPING,
    show_default=True,
    callback=finite_non_negative,
    help="Hessian damping λ >= 0: H + λ·mean(diag H)·I.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random group order.")
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default="bcd",
    show_default=True,
    help="bcd: exact block coordinate descent (monotone); adam: the paper's schedule.",
)
@click.option(
    "--tensors",
    "patterns",
    multiple=True,
    default=("*",),
    show_default=True,
    help="Glob over tensor names; repeat for several. A name without wildcards must exist.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON report [default: next to the output, .report.json].",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="numpy", show_default=True, help=BACKEND_HELP)
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda / cuda:N for GPU backends.")
def factorize(
    weights: Path,
    calib: tuple[Path, ...],
    heldout: Path | None,
    output: Path | None,
    proxy: str,
    init: str | None,
    block_size: int,
    sweeps: int | None,
    tol: float,
    damping: float,
    seed: int,
    schedule: str,
    patterns: tuple[str, ...],
    report: Path | None,
    backend: str,
    device: str,
) -> None:
    """Factorize the 2-D tensors of WEIGHTS (a .safetensors file) as ARMOR layers.

    Each selected tensor that has calibration data is written as blockdiag(A) · S · blockdiag(B), with S
    2:4 sparse (spec §6 format); all other tensors are copied through. For each tensor a table compares the
    four 2:4 baselines with ARMOR: the proxy loss, the relative output error on the calibration data, and
    time. A JSON report with the same numbers and the loss traces is written next to the output.

    \b
    Examples:
        armor-ref factorize model.safetensors --calib acts.npy
        armor-ref factorize model.safetensors --calib acts.npz --proxy hessian \\
            --tensors '*.attention.*.weight' --sweeps 10 -o model.armor.safetensors
    """
    output = output or sibling_path(weights, ".armor.safetensors")
    report = report or sibling_path(output, ".report.json")
    inputs = [weights, *calib] + ([heldout] if heldout else [])
    check_output_path(output, inputs)
    check_output_path(report, [*inputs, output])
    tensors, _ = read_safetensors(weights)
    notes: list[str] = []
    layers, grams = calibrated_layers(tensors, patterns, calib, notes)
    held_grams = load_heldout(heldout, tensors, layers)
    for name in layers:
        check_factorizable(name, tensors[name].shape, block_size)
    factorize_fn = resolve_factorize(backend, device)
    for note in notes:
        click.echo(f"note: {note}", err=True)

    init_name = init or DEFAULT_INIT[proxy]
    budget = DEFAULT_SWEEPS[proxy] if sweeps is None else sweeps
    settings = {
        "proxy": proxy,
        "init": init_name,
        "block_size": block_size,
        "sweeps": budget,
        "tol": tol,
        "damping": damping,
        "seed": seed,
        "schedule": schedule,
        "backend": backend,
        "device": device,
    }
    results, per_tensor = {}, {}
    t_start = time.perf_counter()
    for name in layers:
        W = tensors[name].astype(np.float64)
        gram, n_tokens = grams[name]
        held_gram = held_grams[name][0] if held_grams else None
        with numerical_failures(name):
            base = compare_with_baselines(W, gram, proxy, damping, held_gram)
            result = run_with_progress(
                factorize_fn,
                name,
                budget,
                W,
                gram,
                proxy=proxy,
                init=init_name,
                block_size=block_size,
                tol=tol,
                seed=seed,
                schedule=schedule,
                damping=damping,
            )
            armor = {**layer_metrics(W, result.W_hat(), gram, proxy, damping, held_gram), "seconds": result.seconds}
        results[name] = result
        per_tensor[name] = tensor_report(W, n_tokens, base, armor, result)
        click.echo(factorize_table(name, per_tensor[name]) + "\n")

    passthrough = {k: v for k, v in tensors.items() if k not in results}
    metadata = {**settings, "source": weights.name, "calibration": ",".join(c.name for c in calib)}
    report_paths = {"input": str(weights), "calibration": [str(c) for c in calib], "heldout": heldout and str(heldout)}
    save_armor(output, results, passthrough, metadata)
    total = time.perf_counter() - t_start
    write_json(
        report,
        {
            **report_paths,
            "output": str(output),
            "settings": settings,
            "notes": notes,
            "seconds": total,
            "tensors": per_tensor,
        },
    )
    click.echo(
        f"wrote {output} ({len(results)} factorized, {len(passthrough)} copied through) and {report} in {total:.1f} s"
    )


def tensor_report(W: np.ndarray, n_tokens: int | None, base: dict, armor: dict, result) -> dict:
    """The JSON report entry of one factorized tensor."""
    sparsegpt_error = base["sparsegpt"]["calib_output_error"]
    return {
        "shape": list(W.shape),
        "calibration_tokens": n_tokens,
        "proxy": result.proxy,
        "init": result.init,
        "baselines": base,
        "armor": {
            **armor,
            "start_loss": result.baseline_loss,
            "loss_ratio_to_init": result.loss / result.baseline_loss if result.baseline_loss > 0 else 0.0,
            "calib_error_ratio_to_sparsegpt": armor["calib_output_error"] / sparsegpt_error
            if sparsegpt_error > 0
            else 0.0,
            **heldout_ratio(armor, base["sparsegpt"]),
            "sweeps": result.sweeps,
            "seconds": result.seconds,
            "trace": result.trace,
        },
    }


def heldout_ratio(armor: dict, sparsegpt: dict) -> dict:
    """``{"heldout_error_ratio_to_sparsegpt": …}`` when held-out errors were measured, else ``{}``."""
    if "heldout_output_error" not in armor or sparsegpt["heldout_output_error"] <= 0:
        return {}
    return {"heldout_error_ratio_to_sparsegpt": armor["heldout_output_error"] / sparsegpt["heldout_output_error"]}


def factorize_table(name: str, entry: dict) -> str:
    """The table `armor-ref factorize` prints for one tensor."""
    proxy, armor = entry["proxy"], entry["armor"]
    columns = [c for c in ("proxy_loss", "calib_output_error", "heldout_output_error", "seconds") if c in armor]
    tokens = entry["calibration_tokens"]
    head = (
        f"{name}  {entry['shape'][0]}x{entry['shape'][1]}  proxy={proxy}  init={entry['init']}  "
        f"calibration={'Gram matrix' if tokens is None else f'{tokens} tokens'}"
    )
    table = comparison_table({**entry["baselines"], f"ARMOR ({proxy})": armor}, columns, proxy)
    summary = (
        f"  ARMOR loss / {entry['init']} loss = {armor['loss_ratio_to_init']:.3f}   "
        f"ARMOR calib error / SparseGPT's = {armor['calib_error_ratio_to_sparsegpt']:.3f}   "
    )
    if "heldout_error_ratio_to_sparsegpt" in armor:
        summary += f"held-out error / SparseGPT's = {armor['heldout_error_ratio_to_sparsegpt']:.3f}   "
    summary += f"sweeps = {armor['sweeps']}"
    return f"{head}\n{table}\n{summary}"


# ----------------------------------------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------------------------------------
@cli.command()
@threads_option
@click.argument("weights", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--calib",
    "calib",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Calibration activations or Gram matrices, as for `armor-ref factorize` (repeat to merge files).",
)
@click.option("--method", type=click.Choice(BASELINES), required=True, help="The 2:4 pruning baseline.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file [default: WEIGHTS with .METHOD-2of4.safetensors].",
)
@click.option(
    "--tensors",
    "patterns",
    multiple=True,
    default=("*",),
    show_default=True,
    help="Glob over tensor names; repeat for several.",
)
def prune(weights: Path, calib: tuple[Path, ...], method: str, output: Path | None, patterns: tuple[str, ...]) -> None:
    """Prune the 2-D tensors of WEIGHTS to 2:4 with a baseline; write a plain dense safetensors file.

    Pruned tensors keep their names and dtype (bfloat16 is written as float32); 2 of every 4 consecutive
    weights in each row are zero. Useful to compare ARMOR against the baselines in your own pipeline.

    \b
    Example:
        armor-ref prune model.safetensors --calib acts.npy --method sparsegpt
    """
    output = output or sibling_path(weights, f".{method}-2of4.safetensors")
    check_output_path(output, [weights, *calib])
    tensors, _ = read_safetensors(weights)
    notes: list[str] = []
    layers, grams = calibrated_layers(tensors, patterns, calib, notes)
    for name in layers:
        if tensors[name].shape[1] % GROUP != 0:
            raise ArmorError(
                f"tensor {name!r} {tensors[name].shape}: input dimension is not divisible by 4",
                "leave it out with --tensors",
            )
    for note in notes:
        click.echo(f"note: {note}", err=True)
    pruned, rows = {}, []
    for name in layers:
        W = tensors[name].astype(np.float64)
        gram = grams[name][0]
        S, _ = run_baseline(method, W, gram)
        pruned[name] = S.astype(tensors[name].dtype)
        rows.append(
            [
                name,
                f"{W.shape[0]}x{W.shape[1]}",
                nowag_loss(W, S, np.diag(gram)),
                output_error(W, S, gram, f"output error of {name}"),
            ]
        )
    click.echo(format_table(["tensor", "shape", "nowag loss", "calib out err"], rows))
    write_safetensors(
        output, {**tensors, **pruned}, {"format": "dense-2of4", "method": method, "tensors": ",".join(layers)}
    )
    click.echo(f"wrote {output} ({len(pruned)} tensors pruned with {method})")


# ----------------------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
def inspect(path: Path) -> None:
    """Describe and check a safetensors file, or a compressed directory (written by `armor-ref compress`, or by a
    compressed model's save_pretrained).

    For an ARMOR file: each factorized tensor's shape, the 2:4 check and its size against dense fp16/fp32; for any
    other file: each tensor's shape, dtype and whether it is 2:4. For a directory: the same for every factorized
    tensor of every shard (the 2:4 check of every core), then per block the bytes of its linears as stored against
    the same linears dense (in the dense model's dtype), and the whole model's against the dense model's. Every
    tensor must be finite: NaN or Inf is an error naming the tensor, never "ok". A file written by `armor-ref
    compress` (or its whole directory) is first checked against the run's manifest: the run must be finished and
    every file must match the sha256 the run recorded.

    \b
    Examples:
        armor-ref inspect model.armor.safetensors
        armor-ref inspect ./compressed-model            # a compressed directory: verified, then described
    """
    if path.is_dir():
        inspect_directory(path)
        return
    verify_file(path)
    tensors, metadata = read_finite_safetensors(path)
    if metadata.get("format") != ARMOR_FORMAT:
        click.echo(f"{path}: plain safetensors file, {len(tensors)} tensors")
        rows = []
        for name, array in tensors.items():
            sparse = is_2of4(array) if array.ndim == 2 and array.dtype.kind == "f" else "-"
            rows.append([name, "x".join(map(str, array.shape)), str(array.dtype), sparse, array.nbytes])
        click.echo(format_table(["tensor", "shape", "dtype", "2:4", "bytes"], rows))
        return
    armor = load_armor(path)
    extras = ", ".join(f"{k}={metadata[k]}" for k in ("init", "schedule", "sweeps", "source") if k in metadata)
    click.echo(
        f"{path}: ARMOR file, version {metadata.get('version')}, block size {armor.block_size}, "
        f"proxy {armor.proxy}" + (f" ({extras})" if extras else "")
    )
    click.echo(factor_tables([armor]))


def read_finite_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """:func:`read_safetensors`, with every floating-point tensor finite (an error names the first that is not)."""
    tensors, metadata = read_safetensors(path)
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ArmorError(f"{path}: tensor {name!r} holds NaN or Inf values", "the file is damaged; write it again")
    return tensors, metadata


def checked_armor_file(path: Path, block_size: int | None = None) -> ArmorFile:
    """An ARMOR file with every tensor finite (:func:`read_finite_safetensors`) and every layer valid; ``block_size``
    for a shard of a compressed directory (see :func:`toolkit.armor_format.load_armor`)."""
    read_finite_safetensors(path)
    return load_armor(path, block_size)


def core_check(layer: ArmorLayer) -> str:
    """``ok`` when the decoded core keeps at most 2 of every 4 weights on exactly 2 positions per group."""
    S, mask = layer.core()
    return "ok" if is_2of4(S) and has_two_per_group(mask) else "FAILED"


def armor_table(armors: Sequence[ArmorFile]) -> str:
    """The table `armor-ref inspect` prints for ARMOR files: per factorized tensor, the 2:4 check and its bytes as
    stored, at fp16, and dense; a total row; a line on the passthrough tensors."""
    rows, totals = [], np.zeros(4, dtype=np.int64)
    for armor in armors:
        for name in armor.names:
            layer = armor.layers[name]
            d_out, d_in = layer.shape
            stored = layer.A.nbytes + layer.B.nbytes + layer.values.nbytes + layer.index.nbytes
            at_fp16 = (layer.A.size + layer.B.size + layer.values.size) * 2 + layer.index.nbytes
            sizes = np.array([stored, at_fp16, d_out * d_in * 2, d_out * d_in * 4])
            totals += sizes
            rows.append(
                [name, f"{d_out}x{d_in}", core_check(layer), *map(int, sizes), float(at_fp16 / (d_out * d_in * 2))]
            )
    rows.append(["total", "", "", *map(int, totals), float(totals[1] / totals[2]) if totals[2] else 0.0])
    headers = ["tensor", "shape", "2:4", "armor bytes", "armor@fp16", "dense fp16", "dense fp32", "armor@fp16/fp16"]
    passthrough = [array for armor in armors for array in armor.passthrough.values()]
    return (
        format_table(headers, rows) + f"\npassthrough: {len(passthrough)} tensors, "
        f"{sum(a.nbytes for a in passthrough)} bytes (armor bytes: as stored, values float32; armor@fp16: A, B, "
        "values in fp16)"
    )


def lowrank_table(armors: Sequence[ArmorFile]) -> str:
    """The table `armor-ref inspect` prints for low-rank layers: per layer its rank, the fraction of the dense
    parameters its factors keep, and its bytes as stored, at fp16, and dense; a total row."""
    rows, totals = [], np.zeros(4, dtype=np.int64)
    for armor in armors:
        for name, layer in sorted(armor.lowrank.items()):
            d_out, d_in = layer.shape
            kept = layer.U.size + layer.V.size
            sizes = np.array([layer.U.nbytes + layer.V.nbytes, kept * 2, d_out * d_in * 2, d_out * d_in * 4])
            totals += sizes
            rows.append([name, f"{d_out}x{d_in}", layer.rank, float(kept / (d_out * d_in)), *map(int, sizes)])
    rows.append(["total", "", "", float(totals[1] / totals[2]) if totals[2] else 0.0, *map(int, totals)])
    headers = ["tensor", "shape", "rank", "params kept", "stored bytes", "U,V@fp16", "dense fp16", "dense fp32"]
    return format_table(headers, rows) + "\n(low-rank layers W' = U V: U (d_out, rank), V (rank, d_in), float32)"


def factor_tables(armors: Sequence[ArmorFile]) -> str:
    """:func:`armor_table` for the ARMOR layers and :func:`lowrank_table` for the low-rank ones, each where there
    are any (the ARMOR table always for a file with neither)."""
    has_lowrank = any(armor.lowrank for armor in armors)
    tables = [armor_table(armors)] if any(armor.layers for armor in armors) or not has_lowrank else []
    return "\n".join(tables + ([lowrank_table(armors)] if has_lowrank else []))


def block_label(stem: str) -> str:
    """The block a module belongs to: the first numeric part of its name (``model.layers.3.mlp.up_proj`` → 3), or
    ``head`` for the one compressed module outside the blocks, the LM head (as in `compress`'s table)."""
    return next((part for part in stem.split(".") if part.isdigit()), "head")


def inspect_directory(directory: Path) -> None:
    """`armor-ref inspect DIR`: the run checked against its manifest (a compress run; a save_pretrained directory
    has none), every core's 2:4 check and bytes (:func:`armor_table`), then :func:`block_table`."""
    manifest = verify_run(directory)
    quantization = armor_quantization(read_config(str(directory)))
    files = weight_files(str(directory))
    armors = [checked_armor_file(Path(file), int(quantization["block_size"])) for file in files]
    dense = quantization.get("dense", {})
    checked = (
        f"a finished armor-ref compress run; all {len(manifest['outputs'])} files match the run's manifest (sha256)"
        if manifest
        else "no run manifest (written by save_pretrained, not by compress): not checked against one"
    )
    blocks = f", block size {quantization['block_size']}" if any(armor.layers for armor in armors) else ""
    click.echo(
        f"{directory}: compressed model, method {quantization.get('method')}{blocks}"
        f"; dense model {dense.get('model_type')}, {dense.get('dtype')}; {checked}"
    )
    click.echo(factor_tables(armors))
    click.echo(block_table(files, armors, dense.get("dtype", "float32")))


def block_table(files: Sequence[str], armors: Sequence[ArmorFile], dense_dtype: str) -> str:
    """Per block, the bytes of its factorized linears as stored against the same linears dense in ``dense_dtype``;
    the linears together; the whole model (every tensor as stored) against the dense model."""
    dtype_bytes = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dense_dtype]
    blocks: dict[str, list[int]] = {}  # label -> [linears, armor bytes, dense bytes]
    stored_total = dense_total = 0
    for file, armor in zip(files, armors, strict=True):
        infos, _ = read_safetensors_header(file)
        layers = [(name, ARMOR_SUFFIXES, layer) for name, layer in armor.layers.items()]
        layers += [(name, LOWRANK_SUFFIXES, layer) for name, layer in armor.lowrank.items()]
        for name, suffixes, layer in sorted(layers, key=lambda entry: entry[0]):
            d_out, d_in = layer.shape
            entry = blocks.setdefault(block_label(name), [0, 0, 0])
            entry[0] += 1
            entry[1] += sum(infos[name + s].end - infos[name + s].begin for s in suffixes)
            entry[2] += d_out * d_in * dtype_bytes
        stored_total += sum(info.end - info.begin for info in infos.values())
        dense_total += sum(infos[name].end - infos[name].begin for name in armor.passthrough)
    linears = [sum(e[i] for e in blocks.values()) for i in range(3)]
    dense_total += linears[2]
    rows = [[label, e[0], e[1], e[2], e[1] / e[2]] for label, e in blocks.items()]
    rows.append(["linears", *linears, linears[1] / linears[2]])
    rows.append(["whole model", "", stored_total, dense_total, stored_total / dense_total])
    return (
        format_table(["block", "linears", "armor bytes", "dense bytes", "armor/dense"], rows)
        + f"\n(armor bytes: the A, B, values and index tensors, or the low-rank U and V, as stored; dense bytes: the "
        f"same weights in {dense_dtype}; whole model: every tensor, embeddings, norms and biases as stored)"
    )


# ----------------------------------------------------------------------------------------------------------
# reconstruct, export-dense
# ----------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Dense output file [default: FILE with .dense.safetensors], or directory [default: DIR-dense].",
)
def reconstruct(path: Path, output: Path | None) -> None:
    """Rebuild dense weights from an ARMOR file or a compressed directory: Ŵ = blockdiag(A) · S · blockdiag(B).

    A file: Ŵ in float32 under the dense tensor names (a `compress` shard's module NAME becomes NAME.weight), plus
    every passthrough tensor, as a plain safetensors file; a shard written by `armor-ref compress` is first checked
    against its run's manifest. A directory: the same as `armor-ref export-dense`.

    \b
    Examples:
        armor-ref reconstruct model.armor.safetensors -o model.dense.safetensors
        armor-ref reconstruct ./minilm-armor -o ./minilm-dense
    """
    if path.is_dir():
        write_dense_directory(path, output or path.with_name(path.name + "-dense"))
        return
    output = output or sibling_path(path, ".dense.safetensors")
    check_output_path(output, [path])
    verify_file(path)
    armor = load_armor(path)
    names = [*armor.names, *sorted(armor.lowrank)]
    dense = {dense_tensor_name(name, armor.metadata): armor.reconstruct(name, np.float32) for name in names}
    write_safetensors(output, {**armor.passthrough, **dense}, {"format": "dense", "source": path.name})
    click.echo(f"wrote {output} ({len(dense)} reconstructed, {len(armor.passthrough)} copied through)")


@cli.command("export-dense")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The dense directory to write (must not exist, or be empty).",
)
def export_dense_command(directory: Path, output: Path) -> None:
    """Write a plain checkpoint of a compressed DIRECTORY, loadable by any tool at dense cost.

    Every factorized linear NAME becomes an ordinary NAME.weight = Ŵ in the dense model's own dtype; every other
    tensor is copied. The shards are named and indexed like the dense model's (one model.safetensors when it was
    one file), config.json gets its model type back (no quantization_config), and the tokenizer and
    sentence-transformers files are copied. A compress run is first checked against its manifest. Loading the
    result needs neither this package nor trust_remote_code.

    \b
    Example:
        armor-ref export-dense ./minilm-armor -o ./minilm-dense
    """
    write_dense_directory(directory, output)


def write_dense_directory(directory: Path, output: Path) -> None:
    from .export import export_dense

    summary = export_dense(str(directory), str(output))
    click.echo(
        f"wrote {output}: {summary['reconstructed']} linears rebuilt as dense {summary['dtype']} weights"
        f", {summary['copied']} tensors copied, {len(summary['files'])} weights file(s)"
    )


# ----------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------
@cli.command()
@threads_option
@click.option(
    "--tensors",
    "patterns",
    multiple=True,
    default=("*",),
    show_default=True,
    help="Glob over the example's tensor names (query, key, value weights).",
)
@click.option(
    "--sweeps-nowag",
    type=click.IntRange(min=0),
    default=DEMO_SWEEPS["nowag"],
    show_default=True,
    help="Sweeps of ARMOR with the nowag proxy (the full default: " + BUDGET_HELP + ").",
)
@click.option(
    "--sweeps-hessian",
    type=click.IntRange(min=0),
    default=DEMO_SWEEPS["hessian"],
    show_default=True,
    help="Sweeps of ARMOR with the hessian objective (the full default: " + BUDGET_HELP + ").",
)
@click.option("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="numpy", show_default=True, help=BACKEND_HELP)
@click.option("--device", default="cpu", show_default=True)
def demo(
    patterns: tuple[str, ...],
    sweeps_nowag: int,
    sweeps_hessian: int,
    block_size: int,
    seed: int,
    backend: str,
    device: str,
) -> None:
    """Compare the 2:4 baselines with ARMOR on a bundled real example; writes nothing.

    The example: the query, key and value weights (384x384, fp16) of encoder layer 3 of all-MiniLM-L6-v2,
    with 2048 calibration tokens of its input from Python's documentation (pydoc_data.topics) and 1024
    held-out tokens from standard-library docstrings. For each weight it prints the nowag loss and the
    relative output error on calibration and held-out tokens of magnitude, Wanda, NoWag-P, SparseGPT,
    ARMOR (nowag proxy, from NoWag-P) and ARMOR (hessian objective, from SparseGPT). The sweep budgets are
    kept small: about 5 s of CPU time with --threads 1. Wall time depends on the machine, its load and the
    threads: --threads sets the CPU threads (by default the cores the load average does not show busy); threads
    competing with other work for few cores can make it ten times slower (measured: 5.6 s with --threads 1, 57 s
    with --threads 2, on a 2-core machine already running other work).

    \b
    Examples:
        armor-ref demo
        armor-ref demo --tensors '*query*' --sweeps-nowag 40 --sweeps-hessian 40
    """
    t_start = time.perf_counter()
    tensors, _ = read_safetensors(DEMO_WEIGHTS)
    notes: list[str] = []
    layers, grams = calibrated_layers(tensors, patterns, [DEMO_CALIB], notes)
    heldout = load_calibration(DEMO_HELDOUT, {name: tensors[name] for name in layers})
    for name in layers:
        check_factorizable(name, tensors[name].shape, block_size)
    factorize_fn = resolve_factorize(backend, device)
    summary = []
    for name in layers:
        W = tensors[name].astype(np.float64)
        gram, n_tokens = grams[name]
        held_gram, n_held = heldout[name]
        rows = compare_with_baselines(W, gram, "nowag", DEFAULT_DAMPING, held_gram)
        armor = {}
        for proxy, budget in (("nowag", sweeps_nowag), ("hessian", sweeps_hessian)):
            result = run_with_progress(
                factorize_fn, f"{name} {proxy}", budget, W, gram, proxy=proxy, block_size=block_size, seed=seed
            )
            armor[proxy] = layer_metrics(W, result.W_hat(), gram, "nowag", DEFAULT_DAMPING, held_gram)
            rows[f"ARMOR ({proxy}, {result.sweeps} sw)"] = {**armor[proxy], "seconds": result.seconds}
        base = rows
        click.echo(f"{name}  {W.shape[0]}x{W.shape[1]}  {n_tokens} calibration / {n_held} held-out tokens")
        click.echo(comparison_table(rows, ["nowag_loss", "calib_output_error", "heldout_output_error", "seconds"]))
        click.echo("")
        sgpt, nowag_p = base["sparsegpt"], base["nowag-p"]
        summary.append(
            [
                name.split(".")[-2] if name.count(".") else name,
                armor["nowag"]["nowag_loss"] / nowag_p["nowag_loss"],
                armor["hessian"]["calib_output_error"] / sgpt["calib_output_error"],
                armor["hessian"]["heldout_output_error"] / sgpt["heldout_output_error"],
                armor["nowag"]["calib_output_error"] / sgpt["calib_output_error"],
            ]
        )
    click.echo(DEMO_COLUMNS)
    click.echo("Summary (ratios; below 1 means ARMOR is better):")
    click.echo(
        format_table(
            [
                "tensor",
                "nowag: loss/NoWag-P",
                "hessian: calib err/SparseGPT",
                "hessian: held-out err/SparseGPT",
                "nowag: calib err/SparseGPT",
            ],
            summary,
        )
    )
    click.echo(
        f"demo finished in {time.perf_counter() - t_start:.1f} s "
        f"(sweeps: nowag {sweeps_nowag}, hessian {sweeps_hessian}; more sweeps lower the ratios)"
    )


if __name__ == "__main__":
    main()

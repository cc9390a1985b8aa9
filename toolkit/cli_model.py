"""Click commands for whole models: ``compress`` and ``eval``, registered into the ``armor-ref`` group
(:mod:`toolkit.cli`), whose one error handler reports their failures. ``torchrun`` starts several processes through
the package's ``__main__``::

    torchrun --nproc_per_node 2 -m toolkit compress MODEL_DIR -o OUT --method armor-hessian ...

torch and transformers are imported only when a command runs.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import click

from armor_ref.factorization import BUDGET_HELP
from backends.threads import limit_threads

from .compress import METHODS, CompressSettings
from .errors import EXIT_CODES_HELP
from .report import compression_table, format_table


def threads_option(command: Callable | None = None, *, torch: bool = False) -> Any:
    """Give a command ``--threads N`` and run it with N BLAS and torch threads (``backends.threads``). The default
    is the free cores (those the load average does not show busy), so a busy machine is never oversubscribed.
    ``torch=True`` imports torch first, so that its forward passes are limited too."""

    def decorate(fn: Callable) -> Callable:
        @click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="CPU threads for BLAS and torch [default: the cores not busy, by the load average].",
        )
        @functools.wraps(fn)
        def run(*args: Any, threads: int | None, **kwargs: Any) -> Any:
            if torch:
                import torch as _  # noqa: F401  (so that limit_threads sets its intra-op threads)
            with limit_threads(threads):
                return fn(*args, **kwargs)

        return run

    return decorate(command) if command is not None else decorate


def _init_distributed(device: str) -> None:
    """Join the ``torchrun`` process group when one is announced in the environment (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        if device == "cuda":  # nccl's object broadcasts use the current device: this rank's own GPU
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl")


@click.command("compress", epilog=EXIT_CODES_HELP)
@threads_option(torch=True)
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory (spec §6 shards, config, tokenizer, armor_report.json).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="armor-hessian",
    show_default=True,
    help="armor-nowag / armor-hessian: ARMOR (2:4 core between block-diagonal factors) on the nowag / hessian "
    "objective; armor-anchored: ARMOR on the anchored objective (each layer, fed the compressed model's inputs, "
    "reproduces the original model's outputs); sparsegpt, wanda, nowag-p, magnitude: plain 2:4 pruning; svd, svd-llm, "
    "aa-svd: low-rank factors U V (plain SVD; whitened by the original inputs; anchored), see --ratio.",
)
@click.option("--calib-text", required=True, type=click.Path(dir_okay=False), help="Calibration text file.")
@click.option("--nsamples", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration windows.")
@click.option(
    "--seqlen", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per calibration window."
)
@click.option(
    "--backend",
    default="numpy",
    show_default=True,
    help="Factorization backend: numpy (the fast path on NumPy, CPU), torch (CPU or CUDA), cupy (CUDA), "
    "reference (the plain reference, slow).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where each block runs (forward passes, Gram matrices) and where torch/cupy factorize: cpu, cuda, cuda:1.",
)
@click.option("--block-size", default=32, show_default=True, help="ARMOR block size b.")
@click.option(
    "--sweeps",
    type=click.IntRange(min=0),
    default=None,
    help=f"BCD sweep cap per layer [default: {BUDGET_HELP}].",
)
@click.option(
    "--ratio",
    type=float,
    default=None,
    help="Low-rank methods: the fraction of each linear's parameters kept, in (0, 1]: rank "
    "k = floor(ratio * d_out * d_in / (d_out + d_in)).",
)
@click.option(
    "--refine-epochs",
    type=int,
    default=None,
    help="After each block is compressed, train its factors, norms and biases (2:4 masks fixed) so that the block "
    "reproduces the original block's outputs; epochs over the calibration windows, 0 disables. [default: about "
    "200 steps of 32 windows per block for svd, svd-llm, aa-svd and armor-anchored; 0 for the other methods]",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Calibration windows per forward pass.",
)
@click.option(
    "--lm-head",
    is_flag=True,
    help="Also compress the LM head (causal LMs), calibrated on the final normed hidden states of the compressed "
    "model. Embeddings always stay dense: a lookup has no matmul for 2:4 to speed up.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run in OUT_DIR from its last finished block (same options and inputs), or check "
    "a finished one.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compress(
    model_dir: str,
    out_dir: str,
    method: str,
    calib_text: str,
    nsamples: int,
    seqlen: int,
    backend: str,
    device: str,
    block_size: int,
    sweeps: int | None,
    ratio: float | None,
    refine_epochs: int | None,
    seed: int,
    batch_size: int,
    lm_head: bool,
    resume: bool,
    quiet: bool,
) -> None:
    """Compress every transformer-block linear of MODEL_DIR (a Hugging Face directory) block by block.

    Only one block's weights are in memory at a time: the model is built without weights, each block is read
    from the checkpoint shards onto --device when its turn comes, its linears are compressed in forward order
    (each group calibrated on the outputs of the groups already compressed), its shard is written, and it is
    released. Embeddings, norms and the LM head are copied unchanged (--lm-head compresses the head too).

    \b
    Example (BERT-style encoder, about 10 minutes on 2 CPU cores):
      armor-ref compress ./all-MiniLM-L6-v2 -o ./minilm-armor --calib-text calib.txt
    Several processes, the linears of each block shared among them:
      torchrun --nproc_per_node 2 -m toolkit compress MODEL_DIR -o OUT --calib-text calib.txt

    \b
    Safe to interrupt, one run per directory:
      - Everything that can be checked is checked before the first write: files, shapes against --block-size,
        options, the calibration text. NaN/Inf in weights, activations or results stop the run with one line.
      - OUT_DIR holds a lock (.armor-lock) while a run writes; a second run on it stops (exit 1). The lock of a
        killed run is taken over; a lock from another host is not (delete the file once no run is active there).
      - armor_manifest.json records the settings, the sha256 of every input and of every output file. A run
        killed at any moment, or stopped by a full disk, continues with --resume (same options) to the same bytes
        as an uninterrupted run. --resume refuses a directory that is not one of its runs, other settings, and
        changed inputs. eval, inspect and the loader refuse unfinished or altered outputs.

    At the end it prints, per block, each linear's relative output error on the calibration data and the seconds,
    and writes armor_errors.png (that error against depth; needs matplotlib) beside armor_report.json. The
    directory loads with transformers' own calls after `import armor_ref` (see `armor-ref export-dense` for a plain
    checkpoint).
    """
    from .compress import compress_model

    settings = CompressSettings(
        method=method,
        nsamples=nsamples,
        seqlen=seqlen,
        block_size=block_size,
        sweeps=sweeps,
        seed=seed,
        backend=backend,
        device=device,
        batch_size=batch_size,
        lm_head=lm_head,
        ratio=ratio,
        refine_epochs=refine_epochs,
    )
    _init_distributed(device)
    report = compress_model(model_dir, out_dir, calib_text, settings, resume=resume, progress=not quiet)
    if report.get("already_complete"):
        click.echo(f"{out_dir} already holds this finished run; every file matches its manifest, nothing to do")
    elif report:
        click.echo("Relative output error ‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖² of each linear on the calibration data, per block:")
        click.echo(compression_table(report))
        for note in report.get("notes", []):
            click.echo(f"note: {note}", err=True)
        errors = [layer["relative_output_error"] for layer in report["layers"]]
        refined = f", block refinement {report['seconds_refine']:.1f} s" if report.get("seconds_refine") else ""
        click.echo(
            f"{report['linears']} linears compressed with {method} in {report['seconds_blocks']:.1f} s{refined}; "
            f"relative output error mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}; "
            f"written to {out_dir}" + (f" (plot: {report['error_plot']})" if "error_plot" in report else "")
        )


@click.command("eval", epilog=EXIT_CODES_HELP)
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False), help="Evaluation text.")
@click.option(
    "--reference",
    "reference_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Dense model directory to compare with.",
)
@click.option("--max-length", default=256, show_default=True, help="Perplexity window (causal LMs).")
@click.option("--stride", default=128, show_default=True, help="Perplexity window stride (causal LMs).")
@click.option("--max-passages", default=256, show_default=True, help="Passages evaluated (encoders).")
@click.option("--max-tokens", type=int, default=None, help="Cap on the evaluated tokens (causal LMs).")
@click.option("--device", default="cpu", show_default=True, help="Where the models run: cpu, cuda, cuda:1.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Compute dtype; float16/bfloat16 on CUDA runs the 2:4 cores on the semi-structured sparse kernels.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(
    model_dir: str,
    text_file: str,
    reference_dir: str | None,
    max_length: int,
    stride: int,
    max_passages: int,
    max_tokens: int | None,
    device: str,
    dtype: str,
    as_json: bool,
) -> None:
    """Evaluate MODEL_DIR (dense or compressed): perplexity (causal LMs) or embedding cosine to the reference
    and half-passage retrieval accuracy (encoders). With --reference the dense model's figures are printed beside
    the compressed model's.

    Encoders are evaluated on passages: the text's paragraphs (separated by a blank line) of at least 32 words.

    \b
    Example:
      armor-ref eval ./minilm-armor --text eval.txt --reference ./all-MiniLM-L6-v2
    """
    from .evaluate import evaluate_model

    result = evaluate_model(
        model_dir, text_file, reference_dir, max_length, stride, max_passages, max_tokens, device=device, dtype=dtype
    )
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    compared = side_by_side(result) if reference_dir is not None else []
    shown = {key for row in compared for key in row[3:]}
    for key in sorted(set(result) - shown):
        value = result[key]
        click.echo(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    if compared:
        click.echo(format_table(["", "compressed", "dense (reference)"], [row[:3] for row in compared]))


# metric of the evaluated model -> (label, the reference's figure: a result key, or the value it has by definition)
COMPARED = {
    "perplexity": ("perplexity", "reference_perplexity"),
    "retrieval_accuracy": ("half-passage retrieval accuracy", "reference_retrieval_accuracy"),
    "cosine_to_reference": ("embedding cosine to the dense model", 1.0),
}


def side_by_side(result: dict) -> list[list]:
    """Rows ``[label, model's value, reference's value, keys shown…]`` for `armor-ref eval --reference`."""
    rows = []
    for key, (label, reference) in COMPARED.items():
        if key in result:
            keys = [key] + ([reference] if isinstance(reference, str) else [])
            rows.append([label, result[key], result[reference] if isinstance(reference, str) else reference, *keys])
    return rows


def register_model_commands(group: click.Group) -> click.Group:
    """Add ``compress`` and ``eval`` to a click group."""
    group.add_command(compress)
    group.add_command(evaluate, name="eval")
    return group

"""Sequential, block-by-block compression of a whole Hugging Face checkpoint, safe against kills, full disks,
concurrent runs and bad numbers.

:func:`compress_model` runs these phases, one function each:

1. **Plan** (:func:`plan_run`): check everything that can be checked before anything is written — the options, the
   calibration text (UTF-8 text with enough tokens), every shard's header against its file size and the index
   against the shards, every block tensor present with the shape the config expects, every linear's shape against
   the block size, every tensor outside the blocks finite, the device and the backend, and the output directory
   (new, empty, or one of our runs) — and hash every input file. The model is built with no block weights in memory
   (:func:`toolkit.models.load_model_skeleton`).
2. **Open the output** (:func:`open_output`): create the directory, take its lock (:mod:`toolkit.lock`), and write a
   fresh run manifest (:mod:`toolkit.manifest`) — or, with ``--resume``, check the recorded one: same settings, same
   input hashes, finished files unchanged.
3. **Calibration stream** (:func:`calibration_stream`): ``nsamples`` windows of ``seqlen`` tokens of the text
   (seeded offsets), run through the model up to its first block; the block inputs (hidden states and the keyword
   arguments the model passes to its blocks) form a :class:`CalibrationStream`. A resumed run restores the hidden
   states entering its first unfinished block from the saved stream.
4. **Each block** (:func:`compress_block`), in order: read its weights onto ``device`` (finite, or an error naming
   the tensor); for each *group* of linears (:mod:`toolkit.models`: q/k/v, then o, then the MLP input projections,
   then the MLP output projection), accumulate each linear's Gram matrix ``Xᵀ X`` over the stream (so a group sees
   the outputs of the groups already compressed), compress each linear (:func:`compress_group`: ``factorize`` of the
   chosen backend, a 2:4 baseline, or a low-rank closed form) and put ``Ŵ`` into the block; then forward the stream
   through the compressed block (its outputs, finite, enter the next block). **Two streams** (the anchored and
   low-rank methods, and any run that refines; docs/aa-svd-spec.md): the stream also carries the original model's
   block inputs, a dense copy of the block stays beside the compressed one, each group gets ``G = XᵀX``,
   ``G' = X'ᵀX'`` and ``C = XᵀX'`` (:func:`accumulate_anchored_grams`) where the method needs them, the original
   stream advances through the dense block, and the block is refined (:mod:`toolkit.refine`) before the compressed
   stream advances. :meth:`Output.save_block` writes the block's shard, the stream
   entering the next block, and the manifest, whose write is what makes the block *finished*; the block is released:
   only one block's weights are ever in memory, which is what lets a model larger than memory be compressed.
5. **LM head** (``lm_head``): compressed on the final normed hidden states of the compressed model, its own shard; a
   tied head is untied in the output ``config.json``.
6. **Finish** (:func:`finish_run`): the rest shard (embeddings, norms, the head unless compressed), the output config
   and tokenizer files (:func:`write_output_config`), the index, the report (:func:`build_report`), and last the
   manifest marked complete; then the lock is released.

Every 2:4 method writes the spec §6 layout (``NAME.armor.A/B/values/index``); the plain 2:4 baselines are written with
``A = B = I``, so every output loads the same way and file sizes compare fairly. The low-rank methods write
``NAME.lowrank.U/V`` in the same shards (:mod:`toolkit.armor_format`).

**What is guaranteed.** Every file is written through :func:`toolkit.files.atomic_write`, every step after a finished
block is deterministic, and the manifest records only what is durably on disk. So a run killed at any moment, or
stopped by a full disk at any write, continues with ``resume=True`` to output files identical, byte for byte, to an
uninterrupted run's (the report's timings aside); until the final manifest is written, ``eval``, ``inspect`` and the
loader refuse the directory. A second run on the same directory stops with a one-line error while the first holds the
lock; a lock whose owner died is taken over. NaN or Inf in weights, activations, Gram matrices, factors or metrics
stop the run with an error naming the tensor.

Several processes (``torchrun``): every rank runs the same forward passes; the linears of a group are dealt out
round-robin (linear ``j`` of the group to rank ``j mod world_size``), the owner broadcasts its result, and rank 0
takes the lock, writes the files and tells the others what is finished. Results equal a single process's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from armor_ref.factorization import check_shapes, reconstruct
from armor_ref.lowrank import anchored_loss, anchored_target, rank_for_ratio
from backends.baselines import BASELINES, run_baseline
from backends.objectives import hessian_loss, nowag_loss

from .armor_format import LOWRANK_LAYOUT, armor_metadata, armor_tensors, lowrank_tensors
from .calibration import check_gram
from .errors import ArmorError
from .files import (
    TEMPORARY_NAME,
    copy_file,
    file_sha256,
    read_safetensors,
    read_safetensors_header,
    read_text,
    remove_path,
    remove_temporary_files,
    write_json,
    write_safetensors,
)
from .lock import LOCK_FILE, RunLock, acquire_lock
from .manifest import (
    MANIFEST_FILE,
    WEIGHTS_INDEX,
    hash_files,
    mismatched_files,
    new_manifest,
    read_manifest,
    verify_run,
    write_manifest,
)
from .models import (
    Layout,
    blocks_of,
    checkpoint_name,
    checkpoint_shapes,
    companion_files,
    get_submodule,
    layout_of,
    load_block,
    load_lm_head,
    load_model_skeleton,
    load_tokenizer,
    module_names,
    read_checkpoint_tensor,
    read_config,
    release_block,
    require_device,
    require_torch,
    weight_files,
)
from .report import finite, machine_info, output_error, write_error_plot

ARMOR_METHODS = ("armor-nowag", "armor-hessian", "armor-anchored")
LOWRANK_METHODS = ("svd", "svd-llm", "aa-svd")  # the objectives of armor_ref.lowrank with these names
METHODS = (*ARMOR_METHODS, *BASELINES, *LOWRANK_METHODS)
#: methods whose linears are solved from three Gram matrices, G = XᵀX, G' = X'ᵀX' and C = XᵀX' (the others need G')
ANCHORED_METHODS = ("armor-anchored", *LOWRANK_METHODS)
#: methods that refine each block by default (docs/aa-svd-spec.md §6); the others only with --refine-epochs N
REFINED_BY_DEFAULT = ANCHORED_METHODS
PROGRESS_DIR = ".armor-progress"
REPORT_FILE = "armor_report.json"
REST_SHARD = "model-rest.safetensors"
HEAD_SHARD = "model-lm-head.safetensors"


def block_shard_name(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


def stream_file_name(i: int) -> str:
    """The saved calibration stream entering block ``i`` (``i`` = the number of blocks: the LM head's input)."""
    return f"{PROGRESS_DIR}/stream-{i:05d}.safetensors"


@dataclass(frozen=True)
class CompressSettings:
    """Everything that determines the compressed output; a resumed run must use the same settings."""

    method: str
    nsamples: int = 64
    seqlen: int = 128
    block_size: int = 32
    sweeps: int | None = None  # None: the reference's cap (DEFAULT_SWEEPS), stopping at DEFAULT_TOL
    seed: int = 0
    backend: str = "numpy"
    device: str = "cpu"
    batch_size: int = 8  # calibration sequences per forward pass
    lm_head: bool = False  # also compress the LM head (causal LMs)
    ratio: float | None = None  # low-rank methods: the fraction of each linear's parameters kept
    refine_epochs: int | None = None  # block refinement epochs; None: the method's default (refine_epochs_of)

    def identity(self) -> dict[str, Any]:
        """The settings that must match for ``--resume`` (``device`` and ``batch_size`` do not change results
        of the numpy backend, but are kept so a resumed run is exactly the interrupted one)."""
        return asdict(self)

    @property
    def lowrank(self) -> bool:
        return self.method in LOWRANK_METHODS

    @property
    def anchored(self) -> bool:
        """Whether the linears need ``G``, ``G'`` and ``C`` (and so the original model's inputs beside the
        compressed model's)."""
        return self.method in ANCHORED_METHODS

    @property
    def epochs(self) -> int:
        """Block refinement epochs: ``refine_epochs``, or for :data:`REFINED_BY_DEFAULT` methods
        :func:`toolkit.refine.default_epochs` of the calibration size (about 200 steps per block), else 0."""
        if self.refine_epochs is not None:
            return self.refine_epochs
        if self.method not in REFINED_BY_DEFAULT:
            return 0
        from .refine import default_epochs

        return default_epochs(self.nsamples)

    @property
    def two_streams(self) -> bool:
        """Whether the run carries the original model's block inputs ``X`` beside the compressed model's ``X'``:
        for the anchored methods' Gram matrices and for the refinement's targets."""
        return self.anchored or self.epochs > 0


@dataclass
class LinearResult:
    """One compressed linear, in the layer's own scale: ``Ŵ = blockdiag(A) · S · blockdiag(B)``."""

    A: np.ndarray
    B: np.ndarray
    S: np.ndarray
    M: np.ndarray
    proxy: str  # objective the method optimises ("nowag", "hessian" or "none" for plain pruning)
    report: dict[str, Any] = field(default_factory=dict)

    def W_hat(self) -> np.ndarray:
        return reconstruct(self.A, self.S, self.B)

    @property
    def shape(self) -> tuple[int, int]:
        return self.S.shape

    def tensors(self, stem: str) -> dict[str, np.ndarray]:
        """The stored tensors (spec §6, ``stem.armor.*``)."""
        return armor_tensors(stem, self)

    def refined(self, factors: dict[str, np.ndarray]) -> LinearResult:
        """This result with the factors a block refinement found (the mask unchanged)."""
        return LinearResult(factors["A"], factors["B"], factors["S"], self.M, self.proxy, self.report)


@dataclass
class LowRankResult:
    """One linear replaced by a low-rank product: ``W' = U V``, ``U`` (d_out, k), ``V`` (k, d_in)."""

    U: np.ndarray
    V: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)

    def W_hat(self) -> np.ndarray:
        return self.U @ self.V

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[1]

    def tensors(self, stem: str) -> dict[str, np.ndarray]:
        """The stored tensors (``stem.lowrank.U``, ``stem.lowrank.V``)."""
        return lowrank_tensors(stem, self)

    def refined(self, factors: dict[str, np.ndarray]) -> LowRankResult:
        return LowRankResult(factors["U"], factors["V"], self.report)


@dataclass
class Grams:
    """The calibration Gram matrices of one linear, float64 (d_in, d_in): ``shifted = X'ᵀX'`` (its inputs in the
    compressed model, what every method uses), and for the anchored methods ``original = XᵀX`` (its inputs in the
    original model) and the cross Gram ``cross = XᵀX'``."""

    shifted: np.ndarray
    original: np.ndarray | None = None
    cross: np.ndarray | None = None


def require_finite(values: Any, what: str) -> None:
    """:class:`ArmorError` naming ``what`` when a NumPy array or a torch tensor holds NaN or Inf."""
    ok = bool(values.isfinite().all()) if hasattr(values, "isfinite") else bool(np.all(np.isfinite(values)))
    if not ok:
        raise ArmorError(f"{what} holds NaN or Inf values", "check the model's weights and the calibration text")


# ----------------------------------------------------------------------------------------------------------
# One linear
# ----------------------------------------------------------------------------------------------------------
def compress_linear(
    W: np.ndarray,
    grams: Grams,
    settings: CompressSettings,
    factorize: Callable | None = None,
    name: str = "the layer",
    solve_lowrank: Callable | None = None,
) -> LinearResult | LowRankResult:
    """Compress one weight ``W`` (d_out, d_in) given its calibration Gram matrices.

    ``armor-*`` methods call ``factorize`` (the backend's, spec signature) — ``armor-anchored`` on the anchored
    target ``T = W C_δ G'_δ⁻¹`` with ``G'`` (:func:`armor_ref.lowrank.anchored_target`: the hessian objective there
    is the damped anchored loss up to a constant); the low-rank methods call ``solve_lowrank`` (the backend's
    :func:`armor_ref.lowrank.solve_lowrank`) at the rank of ``settings.ratio``; the 2:4 baselines keep
    ``A = B = I``. The report holds the method's own losses, the relative output error
    ``‖(W − Ŵ)X'ᵀ‖² / ‖W X'ᵀ‖²`` on the calibration data, for the anchored methods the relative anchored error
    ``‖X Wᵀ − X' Ŵᵀ‖² / ‖X Wᵀ‖²``, and the seconds spent. A numerical failure, non-finite factors or a non-finite
    (or undefined) metric is an :class:`ArmorError` naming ``name``."""
    W = np.asarray(W, dtype=np.float64)
    t0 = time.perf_counter()
    try:
        if settings.lowrank:
            out: LinearResult | LowRankResult = lowrank_linear(W, grams, settings, solve_lowrank)
        elif settings.method.startswith("armor-"):
            out = armor_linear(W, grams, settings, factorize)
        else:
            S, M = run_baseline(settings.method, W, grams.shifted)
            d_out, d_in = W.shape
            eye = np.eye(settings.block_size)
            out = LinearResult(
                np.tile(eye, (d_out // len(eye), 1, 1)), np.tile(eye, (d_in // len(eye), 1, 1)), S, M, "none"
            )
            # the objectives ARMOR would start from, for comparison across methods
            out.report = {
                "nowag_loss": nowag_loss(W, S, np.diag(grams.shifted)),
                "hessian_loss": hessian_loss(W, S, grams.shifted),
            }
    except np.linalg.LinAlgError as err:
        raise ArmorError(
            f"{name}: {settings.method} failed numerically ({err})",
            "check the layer's weights and calibration data for NaN/Inf or extreme values",
        ) from None
    seconds = time.perf_counter() - t0
    parts = ("U", "V") if settings.lowrank else ("A", "B", "S")
    for part in parts:
        require_finite(getattr(out, part), f"{name}: the {settings.method} result's {part}")
    report = out.report
    for key in ("baseline_loss", "loss", "nowag_loss", "hessian_loss", "anchored_loss"):
        if key in report:
            finite(report[key], f"{key.replace('_', ' ')} of {name}")
    W_hat = out.W_hat()
    report["relative_output_error"] = output_error(W, W_hat, grams.shifted, f"relative output error of {name}")
    if grams.original is not None:
        report["relative_anchored_error"] = anchored_error(W, W_hat, grams, name)
    report["seconds"] = seconds
    return out


def armor_linear(W: np.ndarray, grams: Grams, settings: CompressSettings, factorize: Callable | None) -> LinearResult:
    """ARMOR on ``(W, G')`` (nowag, hessian) or on the anchored target ``(T, G')`` (anchored, hessian objective)."""
    if factorize is None:
        from backends import get_factorize

        factorize = get_factorize(settings.backend, settings.device)
    proxy = settings.method.removeprefix("armor-")
    target = W
    if proxy == "anchored":
        target, proxy = anchored_target(W, grams.shifted, grams.cross), "hessian"
    res = factorize(
        target, grams.shifted, proxy=proxy, block_size=settings.block_size, sweeps=settings.sweeps, seed=settings.seed
    )
    out = LinearResult(np.asarray(res.A), np.asarray(res.B), np.asarray(res.S), np.asarray(res.M), res.proxy)
    out.report = {
        "init": res.init,
        "baseline_loss": float(res.baseline_loss),
        "loss": float(res.loss),
        "sweeps": int(res.sweeps),
    }
    return out


def lowrank_linear(
    W: np.ndarray, grams: Grams, settings: CompressSettings, solve_lowrank: Callable | None
) -> LowRankResult:
    """The closed form of the method's objective at rank ``⌊ρ d_out d_in / (d_out + d_in)⌋``; its damped anchored
    loss in the report (the loss ``aa-svd`` minimises)."""
    if solve_lowrank is None:
        from backends import get_lowrank

        solve_lowrank = get_lowrank(settings.backend, settings.device)
    assert settings.ratio is not None  # plan_run checked it
    k = rank_for_ratio(settings.ratio, *W.shape)
    factors = solve_lowrank(settings.method, W, k, grams.original, grams.shifted, grams.cross)
    out = LowRankResult(np.asarray(factors.U), np.asarray(factors.V))
    loss = anchored_loss(W, out.W_hat(), grams.original, grams.shifted, grams.cross)
    out.report = {"rank": k, "anchored_loss": loss}
    return out


def anchored_error(W: np.ndarray, W_hat: np.ndarray, grams: Grams, name: str) -> float:
    """``‖X Wᵀ − X' Ŵᵀ‖² / ‖X Wᵀ‖²``: the layer's output error against the original model, relative (undamped
    :func:`armor_ref.lowrank.anchored_loss`, clipped at 0 against the cancellation of its expanded form)."""
    scale = float(np.sum((W @ grams.original) * W))
    loss = anchored_loss(W, W_hat, grams.original, grams.shifted, grams.cross, damping=0.0)
    value = max(loss, 0.0) / scale if scale > 0 else math.nan
    return finite(value, f"relative anchored error of {name}")


# ----------------------------------------------------------------------------------------------------------
# Calibration data: windows of the text, and the stream of block inputs
# ----------------------------------------------------------------------------------------------------------
def calibration_windows(tokenizer: Any, text: str, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """``nsamples`` token windows (nsamples, seqlen) of the tokenised text at random (seeded) offsets.

    Encoders get ``[CLS] … [SEP]`` around ``seqlen − 2`` text tokens, when the tokenizer has them.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    wrap = cls_id is not None and sep_id is not None
    body = seqlen - 2 if wrap else seqlen
    if body <= 0:
        raise ArmorError(f"seqlen {seqlen} is too short", "use --seqlen 3 or more")
    if len(ids) < body + 1:
        raise ArmorError(
            f"the calibration text has {len(ids)} tokens; need at least {body + 1}", "give a longer text or --seqlen"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - body + 1, size=nsamples)
    ids = np.asarray(ids, dtype=np.int64)
    windows = np.stack([ids[s : s + body] for s in starts])
    if wrap:
        windows = np.concatenate([np.full((nsamples, 1), cls_id), windows, np.full((nsamples, 1), sep_id)], axis=1)
    return windows


@dataclass
class CalibrationStream:
    """The calibration data entering the next block, per batch of windows: the hidden states (batch, seqlen, hidden)
    and the keyword arguments the model passes to its blocks (attention mask, rotary position embeddings, ...; the
    same for every block). Only the hidden states change from block to block, so only they are saved for
    ``--resume``. ``hidden`` are the compressed model's block inputs ``X'``; a two-stream run
    (:attr:`CompressSettings.two_streams`) also carries ``original``, the original model's block inputs ``X`` on the
    same windows, saved and restored beside them."""

    hidden: list[Any]
    kwargs: list[dict]
    original: list[Any] | None = None

    def batches(self) -> list[tuple[Any, dict]]:
        return list(zip(self.hidden, self.kwargs, strict=True))

    def advance(self, block: Any, what: str) -> None:
        """Replace the hidden states by ``block``'s outputs (finite, or an error naming ``what``)."""
        self.hidden = forward_stream(block, self.batches(), what)

    def advance_original(self, dense_block: Any, what: str) -> list[Any]:
        """Replace the original model's block inputs by the outputs of the original (dense) block, and return them
        (the targets of the block refinement)."""
        assert self.original is not None
        self.original = forward_stream(dense_block, list(zip(self.original, self.kwargs, strict=True)), what)
        return self.original

    def tensors(self) -> dict[str, Any]:
        """What is saved for ``--resume``: ``hidden.NNNNN`` per batch, and ``original.NNNNN`` in a two-stream run."""
        saved = {f"hidden.{j:05d}": h.detach().cpu() for j, h in enumerate(self.hidden)}
        for j, h in enumerate(self.original or []):
            saved[f"original.{j:05d}"] = h.detach().cpu()
        return saved

    def restore(self, tensors: dict[str, np.ndarray], device: str, source: str) -> None:
        """Put saved hidden states (:meth:`tensors`) back, on ``device``."""
        torch = require_torch()
        expected = self.tensors()
        if {k: tuple(v.shape) for k, v in tensors.items()} != {k: tuple(v.shape) for k, v in expected.items()}:
            raise ArmorError(f"{source} does not fit this run's calibration batches", "start again in a new directory")
        restored = {name: torch.from_numpy(tensors[name]).to(device) for name in sorted(expected)}
        self.hidden = [t for name, t in restored.items() if name.startswith("hidden.")]
        if self.original is not None:
            self.original = [t for name, t in restored.items() if name.startswith("original.")]


def forward_stream(block: Any, batches: list[tuple[Any, dict]], what: str) -> list[Any]:
    """``block``'s outputs on every batch, each finite (or an error naming ``what``)."""
    torch = require_torch()
    with torch.no_grad():
        outputs = [run_block(block, h, kw).detach().clone() for h, kw in batches]
    for j, h in enumerate(outputs):
        require_finite(h, f"{what} (calibration batch {j})")
    return outputs


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are known."""


def capture_block_inputs(
    model: Any, blocks: Any, windows: np.ndarray, batch_size: int, causal: bool
) -> list[tuple[Any, dict]]:
    """Run the model up to its first block, per batch of windows; return ``[(hidden_states, block_kwargs)]``."""
    torch = require_torch()
    captured: list[tuple[Any, dict]] = []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().clone(), {**kwargs, "_extra_args": args[1:]}))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                input_ids = torch.from_numpy(windows[start : start + batch_size])
                try:
                    extra = {"use_cache": False} if causal else {}
                    model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def to_device(obj: Any, device: str) -> Any:
    """``obj`` with every tensor inside it (tuples, lists, dicts) moved to ``device``."""
    if hasattr(obj, "to") and hasattr(obj, "device"):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def forward_device(settings: CompressSettings, world: int) -> str:
    """Where the blocks run: ``settings.device``; under ``torchrun`` with CUDA, this process's own GPU."""
    if settings.device == "cuda" and world > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return settings.device


def run_block(block: Any, hidden: Any, kwargs: dict) -> Any:
    """The block's output hidden states for one batch."""
    kwargs = dict(kwargs)
    extra = kwargs.pop("_extra_args", ())
    out = block(hidden, *extra, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def accumulate_grams(block: Any, linears: dict[str, Any], batches: list[tuple[Any, dict]]) -> dict[str, np.ndarray]:
    """Forward every batch through ``block`` and return each named linear's input Gram matrix ``Xᵀ X``
    (float64, over all calibration tokens).

    The forward of a batch stops as soon as every linear of the group has seen its input (nothing after them
    is needed), and linears fed the very same tensor (q/k/v, gate/up) share one ``Xᵀ X`` product."""
    torch = require_torch()
    grams: dict[str, Any] = {name: 0 for name in linears}
    seen: dict[str, Any] = {}  # linear name -> its input in the current batch

    def make_hook(name: str) -> Callable:
        def hook(module: Any, args: tuple) -> None:
            x = args[0]
            twin = next((other for other, t in seen.items() if t is x), None)
            if twin is not None:
                grams[name] += seen_products[twin]
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                seen_products[name] = flat.T @ flat
                grams[name] += seen_products[name]
            seen[name] = x
            if len(seen) == len(linears):
                raise _StopForward

        return hook

    seen_products: dict[str, Any] = {}
    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        with torch.no_grad():
            for hidden, kwargs in batches:
                seen.clear()
                seen_products.clear()
                try:
                    run_block(block, hidden, kwargs)
                except _StopForward:
                    pass
                if len(seen) != len(linears):
                    missing = sorted(set(linears) - set(seen))
                    raise ArmorError(
                        f"linear(s) {', '.join(missing)} were not called by the block's forward",
                        "this architecture's layout in toolkit/models.py does not fit the model",
                    )
    finally:
        for h in handles:
            h.remove()
    return {name: g.cpu().numpy() for name, g in grams.items()}


def group_inputs(block: Any, linears: dict[str, Any], hidden: Any, kwargs: dict) -> dict[str, Any]:
    """The input each named linear of ``block`` receives when one batch is forwarded (the forward stops once every
    linear has its input); linears fed the very same tensor (q/k/v, gate/up) get that same tensor object."""
    torch = require_torch()
    seen: dict[str, Any] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: Any, args: tuple) -> None:
            seen[name] = args[0]
            if len(seen) == len(linears):
                raise _StopForward

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        with torch.no_grad():
            run_block(block, hidden, kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(linears):
        missing = sorted(set(linears) - set(seen))
        raise ArmorError(
            f"linear(s) {', '.join(missing)} were not called by the block's forward",
            "this architecture's layout in toolkit/models.py does not fit the model",
        )
    return seen


def accumulate_anchored_grams(
    dense_block: Any, block: Any, linears: dict[str, Any], stream: CalibrationStream
) -> dict[str, Grams]:
    """Each named linear's three Gram matrices over the calibration stream (float64): ``G = XᵀX`` of its inputs in
    the original model (the dense block fed the original block inputs), ``G' = X'ᵀX'`` of its inputs in the
    compressed model (``block``, whose earlier groups are already compressed, fed the compressed model's block
    inputs) and the cross Gram ``C = XᵀX'``. Linears that share an input share the products."""
    torch = require_torch()
    assert stream.original is not None
    dense_linears = {rel: get_submodule(dense_block, rel) for rel in linears}
    sums: dict[str, list[Any]] = {rel: [0, 0, 0] for rel in linears}
    for x, x_shift, kwargs in zip(stream.original, stream.hidden, stream.kwargs, strict=True):
        original = group_inputs(dense_block, dense_linears, x, kwargs)
        shifted = group_inputs(block, linears, x_shift, kwargs)
        products: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        for rel in linears:
            key = (id(original[rel]), id(shifted[rel]))
            if key not in products:
                X = original[rel].detach().reshape(-1, original[rel].shape[-1]).to(torch.float64)
                X_shift = shifted[rel].detach().reshape(-1, shifted[rel].shape[-1]).to(torch.float64)
                products[key] = (X.T @ X, X_shift.T @ X_shift, X.T @ X_shift)
            sums[rel] = [total + p for total, p in zip(sums[rel], products[key], strict=True)]
    return {rel: Grams(*(g.cpu().numpy() for g in (G_shift, G, C))) for rel, (G, G_shift, C) in sums.items()}


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------
def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_result(result: LinearResult | None, owner: int, world: int) -> LinearResult:
    """Broadcast the owner rank's result to every rank (a no-op in a single process)."""
    if world == 1:
        assert result is not None
        return result
    import torch.distributed as dist

    box = [result]
    dist.broadcast_object_list(box, src=owner)
    return box[0]


def on_rank0(step: Callable[[], Any], rank: int, world: int) -> Any:
    """Run ``step`` on rank 0 only and hand its result — or its :class:`ArmorError` — to every rank."""
    outcome: tuple[Any, ArmorError | None] = (None, None)
    if rank == 0:
        try:
            outcome = (step(), None)
        except ArmorError as err:
            if world == 1:
                raise
            outcome = (None, err)
    if world > 1:
        import torch.distributed as dist

        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def _progress(total: int, desc: str, position: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        position=position,
        leave=position == 0,
        file=sys.stderr,
        disable=disable,
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------------------------------------------------
# Phase 1: plan and check, before anything is written
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A planned run: inputs, settings and the model skeleton, all checked by :func:`plan_run` before anything is
    written."""

    model_dir: str
    out_dir: str
    settings: CompressSettings
    config: dict[str, Any]
    layout: Layout
    model: Any  # the skeleton: no block weights in memory
    locations: dict[str, str]  # checkpoint tensor name -> file
    windows: np.ndarray  # calibration token windows (nsamples, seqlen)
    inputs: dict[str, Any]  # the manifest's "inputs": paths and sha256 of every file read
    block_names: list[set[str]]  # checkpoint tensors of each block
    rest_names: list[str]  # checkpoint tensors copied to the rest shard
    factorize: Callable | None
    solve_lowrank: Callable | None
    device: str
    rank: int
    world: int

    @property
    def blocks(self) -> Any:
        return blocks_of(self.model, self.layout)

    def prefix(self, i: int) -> str:
        return module_names(self.model)[id(self.blocks[i])]


def check_settings(settings: CompressSettings) -> None:
    """Options in range (the command line checks most of them already; the Python API arrives here)."""
    if settings.method not in METHODS:
        raise ArmorError(f"unknown method {settings.method!r}", f"choose one of {', '.join(METHODS)}")
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(settings, name) <= 0:
            raise ArmorError(f"--{name.replace('_', '-')} must be positive", "give a positive number")
    if settings.sweeps is not None and settings.sweeps < 0:
        raise ArmorError("--sweeps must not be negative", "give 0 or more, or leave it out for the default")
    if settings.block_size <= 0 or settings.block_size % 4:
        raise ArmorError(f"block size {settings.block_size} must be a positive multiple of 4", "e.g. --block-size 32")
    if settings.lowrank and settings.ratio is None:
        raise ArmorError(
            f"--method {settings.method} needs --ratio", "give the fraction of parameters to keep, e.g. --ratio 0.6"
        )
    if settings.ratio is not None and not settings.lowrank:
        raise ArmorError(f"--ratio applies to the low-rank methods, not {settings.method}", "leave out --ratio")
    if settings.ratio is not None and not (math.isfinite(settings.ratio) and 0 < settings.ratio <= 1):
        raise ArmorError(
            f"--ratio {settings.ratio} is outside (0, 1]", "give the fraction of parameters to keep, e.g. --ratio 0.6"
        )
    if settings.refine_epochs is not None and settings.refine_epochs < 0:
        raise ArmorError("--refine-epochs must not be negative", "give 0 (no refinement) or more, or leave it out")


def is_empty_output(out_dir: str) -> bool:
    """True for a directory that is absent or holds nothing but what a run killed before its first manifest leaves:
    its lock file and the manifest's temporary file."""
    if not os.path.isdir(out_dir):
        return True
    manifest_temporary = f".{MANIFEST_FILE}."
    return all(
        name == LOCK_FILE or (TEMPORARY_NAME.match(name) and name.startswith(manifest_temporary))
        for name in os.listdir(out_dir)
    )


def check_output_directory(model_dir: str, out_dir: str, resume: bool) -> None:
    """The output directory is new, empty, or (with ``resume``) one of our runs; compress never writes into a
    directory it did not create."""
    if os.path.realpath(model_dir) == os.path.realpath(out_dir):
        raise ArmorError("the output directory must differ from the model directory", "choose another -o directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ArmorError(f"{out_dir!r} exists and is not a directory", "choose another -o directory")
    if is_empty_output(out_dir):
        return
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ArmorError(
            f"output directory {out_dir!r} is not empty and holds no armor-ref run",
            "choose a new or empty directory (compress never writes into a directory it did not create)",
        )
    if not resume:
        state = "a finished" if manifest["complete"] else "an unfinished"
        raise ArmorError(
            f"output directory {out_dir!r} is not empty: it holds {state} armor-ref run",
            "pass --resume to continue (or check) it, or choose another directory",
        )


def check_model_tensors(
    model: Any, blocks: Any, locations: dict[str, str], layout: Layout, settings: CompressSettings
) -> None:
    """Every block parameter is in the checkpoint with the shape the config gives it, and every linear to compress
    splits into blocks of the block size (2:4 methods) or keeps rank ≥ 1 at the ratio (low-rank methods) — so nothing
    fails half-way for a reason that was known at the start."""
    shapes = checkpoint_shapes(locations)
    names = module_names(model)
    for block in blocks:
        prefix = names[id(block)]
        for local, param in block.named_parameters():
            ck = checkpoint_name(f"{prefix}.{local}", locations)
            if ck is None:
                raise ArmorError(
                    f"the checkpoint lacks {prefix}.{local}",
                    "restore the missing tensor or shard (and its index entry)",
                )
            if shapes[ck] != tuple(param.shape):
                raise ArmorError(
                    f"{ck} has shape {shapes[ck]}, the config expects {tuple(param.shape)}",
                    "use the config.json saved with these weights",
                )
        for rel in layout.linears:
            check_linear_shape(f"{prefix}.{rel}", *get_submodule(block, rel).weight.shape, settings)


def check_linear_shape(name: str, d_out: int, d_in: int, settings: CompressSettings) -> None:
    """:class:`ArmorError` unless the method can compress a (d_out, d_in) linear: the block size divides it (2:4
    methods), or the ratio leaves it rank ≥ 1 (low-rank methods; the error names the smallest workable ratio)."""
    try:
        if settings.lowrank:
            assert settings.ratio is not None
            rank_for_ratio(settings.ratio, d_out, d_in)
        else:
            check_shapes(d_out, d_in, settings.block_size)
    except ValueError as err:
        if settings.lowrank:  # the message names the smallest workable ratio
            raise ArmorError(f"{name} ({d_out}x{d_in}): {err}") from None
        fix = "choose a --block-size (a multiple of 4) that divides every linear's dimensions"
        raise ArmorError(f"{name} ({d_out}x{d_in}): {err}", fix) from None


def check_lm_head(config: dict[str, Any], layout: Layout, settings: CompressSettings) -> None:
    """``--lm-head`` needs a causal LM whose head the method can compress (:func:`check_linear_shape`)."""
    if layout.final_norm is None:
        raise ArmorError(
            f"--lm-head: a {config.get('model_type')} encoder has no LM head to compress", "leave out --lm-head"
        )
    vocab, hidden = config.get("vocab_size", 0), config.get("hidden_size", 0)
    try:
        check_linear_shape("--lm-head: the head", vocab, hidden, settings)
    except ArmorError as err:
        raise ArmorError(err.problem, "leave the head dense, or " + err.fix) from None


def block_tensor_names(model: Any, block: Any, locations: dict[str, str]) -> set[str]:
    """Checkpoint tensor names that belong to ``block`` (parameters and persistent buffers)."""
    prefix = module_names(model)[id(block)]
    out = set()
    for local, _ in list(block.named_parameters()) + list(block.named_buffers()):
        ck = checkpoint_name(f"{prefix}.{local}", locations)
        if ck is not None:
            out.add(ck)
    return out


def input_record(model_dir: str, calib_text: str) -> dict[str, Any]:
    """The manifest's ``inputs``: where the model and the calibration text are, and the sha256 of every file read
    (weights, index, config, tokenizer files, calibration text)."""
    names = {os.path.relpath(path, model_dir) for path in weight_files(model_dir)} | set(companion_files(model_dir))
    if os.path.isfile(os.path.join(model_dir, WEIGHTS_INDEX)):
        names.add(WEIGHTS_INDEX)
    return {
        "model_dir": os.path.abspath(model_dir),
        "model_files": hash_files(model_dir, names),
        "calibration_text": os.path.abspath(calib_text),
        "calibration_sha256": file_sha256(calib_text),
    }


def plan_run(model_dir: str, out_dir: str, calib_text: str, settings: CompressSettings, resume: bool) -> Run:
    """Check everything that can be checked before any output is written; build the skeleton and the calibration
    windows; hash the inputs. Raises one-line :class:`ArmorError` s."""
    check_settings(settings)
    config = read_config(model_dir)
    layout = layout_of(config)
    text = read_text(calib_text, "calibration text")
    check_output_directory(model_dir, out_dir, resume)
    require_device(settings.device)
    if settings.lm_head:
        check_lm_head(config, layout, settings)
    factorize = solve_lowrank = None
    from backends import BackendUnavailable, get_factorize, get_lowrank

    try:
        if settings.method.startswith("armor-"):
            factorize = get_factorize(settings.backend, settings.device)
        elif settings.lowrank:
            solve_lowrank = get_lowrank(settings.backend, settings.device)
    except BackendUnavailable as exc:
        raise ArmorError(str(exc)) from None
    model, layout, locations = load_model_skeleton(model_dir)  # every shard header checked against its file
    blocks = blocks_of(model, layout)
    check_model_tensors(model, blocks, locations, layout, settings)
    block_names = [block_tensor_names(model, block, locations) for block in blocks]
    compressed_head = set()
    if settings.lm_head:
        head_name = module_names(model)[id(model.get_output_embeddings())]
        compressed_head = {checkpoint_name(f"{head_name}.weight", locations)} - {None}
    rest_names = sorted(set(locations).difference(*block_names, compressed_head))
    for name in sorted(set(locations).difference(*block_names)):  # block tensors: as their block is read
        require_finite(read_checkpoint_tensor(locations, name), f"checkpoint tensor {name}")
    windows = calibration_windows(load_tokenizer(model_dir), text, settings.nsamples, settings.seqlen, settings.seed)
    rank, world = dist_rank_world()
    return Run(
        model_dir=model_dir,
        out_dir=out_dir,
        settings=settings,
        config=config,
        layout=layout,
        model=model,
        locations=locations,
        windows=windows,
        inputs=input_record(model_dir, calib_text),
        block_names=block_names,
        rest_names=rest_names,
        factorize=factorize,
        solve_lowrank=solve_lowrank,
        device=forward_device(settings, world),
        rank=rank,
        world=world,
    )


# ----------------------------------------------------------------------------------------------------------
# Phase 2: the output directory, its lock and its manifest
# ----------------------------------------------------------------------------------------------------------
def shard_metadata(settings: CompressSettings) -> dict[str, str]:
    """Header metadata of every output shard: spec §6's keys plus the method, its sweep budget and the refinement
    epochs; for the low-rank methods also the ratio and the layout of ``NAME.lowrank.*``. ``proxy`` is the objective
    the linears were fitted to: ``nowag``, ``hessian``, ``anchored`` (ARMOR), ``none`` (plain 2:4) or the low-rank
    method's own name."""
    sweeps = "default" if settings.sweeps is None else str(settings.sweeps)
    proxy = settings.method.removeprefix("armor-") if settings.method.startswith("armor-") else "none"
    extra: dict[str, object] = {"method": settings.method, "sweeps": sweeps, "refine_epochs": str(settings.epochs)}
    if settings.lowrank:
        proxy = settings.method
        extra.update(ratio=str(settings.ratio), lowrank_layout=LOWRANK_LAYOUT)
    return armor_metadata(settings.block_size, proxy, extra)


def check_resumable(run: Run, manifest: dict[str, Any], resume: bool) -> None:
    """A recorded run may be continued only with ``resume``, the same settings and the same inputs, and only from
    files that still hold what it wrote."""
    out = run.out_dir
    if not resume:
        raise ArmorError(f"output directory {out!r} is not empty", "pass --resume to continue it, or choose another")
    old, new = manifest["settings"], run.settings.identity()
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ArmorError(
            f"cannot resume {out!r}: settings differ from the interrupted run ({'; '.join(diffs)})",
            "resume with the run's own settings, or write to another directory",
        )
    recorded, current = manifest["inputs"], run.inputs
    old_files, new_files = recorded.get("model_files", {}), current["model_files"]
    changed = [k for k in sorted(set(old_files) | set(new_files)) if old_files.get(k) != new_files.get(k)]
    if recorded.get("calibration_sha256") != current["calibration_sha256"]:
        changed.append("the calibration text")
    if changed:
        raise ArmorError(
            f"cannot resume {out!r}: its inputs changed since the run started ({', '.join(changed)})",
            "restore the original model and calibration text, or start again in another directory",
        )
    if manifest["complete"]:
        verify_run(out)
        return
    files = dict(manifest["outputs"])
    stream = manifest["progress"].get("stream")
    if stream:
        files[stream["file"]] = stream["sha256"]
    bad = mismatched_files(out, files)
    if bad:
        raise ArmorError(
            f"cannot resume {out!r}: {bad[0]} is missing or differs from what the run wrote",
            "start again in another directory",
        )


def open_output(run: Run, resume: bool) -> tuple[dict[str, Any], RunLock]:
    """Create the output directory, take its lock, and return the run's manifest: a fresh one (written), or the
    recorded one, checked by :func:`check_resumable`. Leftovers of a kill (temporary files) are removed."""
    os.makedirs(run.out_dir, exist_ok=True)
    lock = acquire_lock(run.out_dir)
    try:
        manifest = read_manifest(run.out_dir)
        if manifest is None:
            check_output_directory(run.model_dir, run.out_dir, resume)  # again, under the lock
            manifest = new_manifest(run.settings.identity(), run.inputs)
            manifest["progress"] = {
                "finished_blocks": 0,
                "head_done": False,
                "stream": None,
                "layers": [],
                "blocks": [],
            }
            write_manifest(run.out_dir, manifest)
        else:
            check_resumable(run, manifest, resume)
        for directory in (run.out_dir, os.path.join(run.out_dir, PROGRESS_DIR)):
            remove_temporary_files(directory)
        return manifest, lock
    except BaseException:
        lock.release()
        raise


class Output:
    """The output directory of a run, held under its lock: the manifest (what is finished) and the files it lists.
    Every write goes through here; only rank 0 writes, but every rank knows the manifest."""

    def __init__(self, run: Run, manifest: dict[str, Any]) -> None:
        self.run, self.manifest = run, manifest
        self.writer = run.rank == 0

    @property
    def progress(self) -> dict[str, Any]:
        return self.manifest["progress"]

    def path(self, name: str) -> str:
        return os.path.join(self.run.out_dir, name)

    def write_shard(self, name: str, tensors: dict[str, Any]) -> None:
        """Write an output shard (every tensor finite, or an error naming it) and record its sha256."""
        for tensor_name, tensor in tensors.items():
            require_finite(tensor, f"{tensor_name} (for {name})")
        write_safetensors(self.path(name), tensors, shard_metadata(self.run.settings))
        self.record(name)

    def record(self, name: str) -> None:
        self.manifest["outputs"][name] = file_sha256(self.path(name))

    def commit(self) -> None:
        """Write the manifest: what it records is now finished."""
        write_manifest(self.run.out_dir, self.manifest)

    def save_stream(self, i: int, stream: CalibrationStream | None) -> str | None:
        """Save the stream entering block ``i`` (``None``: nothing comes after); return the stream it replaces."""
        old = self.progress["stream"]
        if stream is None:
            self.progress["stream"] = None
        else:
            name = stream_file_name(i)
            os.makedirs(self.path(PROGRESS_DIR), exist_ok=True)
            write_safetensors(self.path(name), stream.tensors(), {"format": "armor-calibration-stream"})
            self.progress["stream"] = {"file": name, "sha256": file_sha256(self.path(name))}
        return old["file"] if old else None

    def save_block(self, i: int, tensors: dict, layers: list[dict], timing: dict, stream: CalibrationStream) -> None:
        """Block ``i`` is done; the stream entering the next block is kept when anything comes after."""
        more = i + 1 < len(self.run.block_names) or self.run.settings.lm_head
        self.save_step(
            block_shard_name(i), tensors, layers, timing, i + 1, stream if more else None, finished_blocks=i + 1
        )

    def save_head(self, tensors: dict, layers: list[dict], timing: dict) -> None:
        """The LM head is done; nothing comes after it."""
        self.save_step(HEAD_SHARD, tensors, layers, timing, len(self.run.block_names), None, head_done=True)

    def save_step(
        self,
        shard: str,
        tensors: dict,
        layers: list[dict],
        timing: dict,
        next_step: int,
        stream: CalibrationStream | None,
        **progress: Any,
    ) -> None:
        """A step is done: its shard, the stream entering the next step (if any), then the manifest — the write that
        makes the step finished — and last the removal of the stream it replaces (rank 0 only)."""
        if not self.writer:
            return
        self.write_shard(shard, tensors)
        old = self.save_stream(next_step, stream)
        self.progress.update(progress)
        self.progress["layers"] += layers
        self.progress["blocks"].append(timing)
        self.commit()
        if old:
            remove_path(self.path(old))

    def complete(self) -> None:
        """The last write of a run: the manifest, marked complete, listing every output file's sha256."""
        remove_path(self.path(PROGRESS_DIR))
        del self.manifest["progress"]
        self.manifest["complete"] = True
        self.commit()


# ----------------------------------------------------------------------------------------------------------
# Phases 3-5: the calibration stream, the blocks, the LM head
# ----------------------------------------------------------------------------------------------------------
def calibration_stream(run: Run, output: Output) -> CalibrationStream:
    """The block inputs of the calibration windows: captured in front of the first block (cheap: embeddings only),
    with the hidden states replaced by the saved ones when the run resumes after its first block. A two-stream run
    starts both streams from the same embeddings."""
    captured = capture_block_inputs(
        run.model, run.blocks, run.windows, run.settings.batch_size, run.layout.kind == "causal"
    )
    captured = to_device(captured, run.device)
    stream = CalibrationStream([h for h, _ in captured], [kw for _, kw in captured])
    for j, h in enumerate(stream.hidden):
        require_finite(h, f"the inputs of the first block (embeddings of calibration batch {j})")
    if run.settings.two_streams:
        stream.original = [h.clone() for h in stream.hidden]
    saved = output.progress["stream"]
    if saved:
        stream.restore(read_safetensors(output.path(saved["file"]))[0], run.device, output.path(saved["file"]))
    return stream


def group_grams(run: Run, dense_block: Any, block: Any, linears: dict[str, Any], stream: CalibrationStream) -> dict:
    """The Gram matrices the method needs for one group: ``G``, ``G'``, ``C`` for the anchored methods
    (:func:`accumulate_anchored_grams`), else ``G'`` alone (:func:`accumulate_grams`, today's cost)."""
    if run.settings.anchored:
        return accumulate_anchored_grams(dense_block, block, linears, stream)
    return {rel: Grams(g) for rel, g in accumulate_grams(block, linears, stream.batches()).items()}


def checked_grams(grams: Grams, name: str) -> Grams:
    """``grams`` with ``G'`` and ``G`` usable Gram matrices (:func:`toolkit.calibration.check_gram`), ``C`` finite."""
    check_gram(grams.shifted, f"inputs of {name}")
    if grams.original is not None:
        check_gram(grams.original, f"inputs of {name} in the original model")
        require_finite(grams.cross, f"the cross Gram matrix XᵀX' of {name}")
    return grams


def compress_group(run: Run, prefix: str, linears: dict[str, Any], grams: dict[str, Grams]) -> dict:
    """Compress the linears of one group (their Gram matrices given), each on its owner rank, and put each ``Ŵ``
    into the block."""
    torch = require_torch()
    results: dict[str, LinearResult | LowRankResult] = {}
    for j, (rel, linear) in enumerate(linears.items()):
        owner = j % run.world
        mine = None
        if owner == run.rank:
            W = linear.weight.detach().cpu().to(torch.float64).numpy()
            name = f"{prefix}.{rel}"
            layer_grams = checked_grams(grams[rel], name)
            mine = compress_linear(W, layer_grams, run.settings, run.factorize, name, run.solve_lowrank)
        result = share_result(mine, owner, run.world)
        linear.weight.data.copy_(torch.from_numpy(result.W_hat()))
        results[rel] = result
    return results


def compress_block(run: Run, i: int, stream: CalibrationStream, bar: Any) -> tuple[dict, dict[str, Any]]:
    """Compress block ``i``: read its weights, then group by group Gram matrices → compress → replace; then, in a
    two-stream run, forward the original stream through the original (dense) block and refine the block
    (:func:`refine`); finally forward the stream through the compressed block (the next block's inputs). Returns
    the results by linear and what :func:`refine` returns (empty when the block is not refined)."""
    block, prefix = run.blocks[i], run.prefix(i)
    load_block(run.model, block, run.locations, run.device)
    for local, param in block.named_parameters():
        require_finite(param, f"checkpoint tensor {prefix}.{local}")
    dense_block = copy.deepcopy(block) if run.settings.two_streams else None  # the original block, beside
    results: dict[str, LinearResult | LowRankResult] = {}
    for group in run.layout.groups:
        linears = {rel: get_submodule(block, rel) for rel in group}
        grams = group_grams(run, dense_block, block, linears, stream)
        results.update(compress_group(run, prefix, linears, grams))
        bar.set_postfix_str(f"{group[-1]} rel.err {results[group[-1]].report['relative_output_error']:.4f}")
        bar.update(len(group))
    refinement: dict[str, Any] = {}
    if dense_block is not None:
        targets = stream.advance_original(dense_block, f"the outputs of the original {prefix}")
        del dense_block
        if run.settings.epochs > 0:
            refinement = refine(run, i, block, results, stream.batches(), targets)
    stream.advance(block, f"the outputs of {prefix}")
    return results, refinement


def refine(run: Run, i: int, block: Any, results: dict, inputs: list, targets: list) -> dict[str, Any]:
    """Refine block ``i`` (:func:`toolkit.refine.refine_block`, on rank 0; the outcome is shared): put the refined
    factors into ``results`` and their ``Ŵ`` into the block's linears, and the refined norms and biases — rounded to
    the checkpoint's dtype, as they will be stored — into the block. Returns the refinement's report and the refined
    1-D parameters (``{"report": …, "params": {name in the block: tensor}}``)."""
    torch = require_torch()
    linears = {rel: get_submodule(block, rel) for rel in results}
    mine = None
    if run.rank == 0:
        from .refine import refine_block

        settings = run.settings
        mine = refine_block(
            block,
            linears,
            results,
            inputs,
            targets,
            settings.epochs,
            settings.batch_size,
            settings.seed + i,
            run_block,
            run.prefix(i),
        )
    refinement = share_result(mine, 0, run.world)
    prefix = run.prefix(i)
    params = dict(block.named_parameters())
    stored = {}
    with torch.no_grad():
        for name, value in refinement.params.items():
            dtype = read_checkpoint_tensor(run.locations, checkpoint_name(f"{prefix}.{name}", run.locations)).dtype
            stored[name] = value.to(dtype)
            params[name].copy_(stored[name].to(params[name].dtype))
        for rel, factors in refinement.factors.items():
            results[rel] = results[rel].refined(factors)
            linears[rel].weight.copy_(torch.from_numpy(results[rel].W_hat()))
    return {"report": refinement.report, "params": stored}


def block_tensors(run: Run, i: int, results: dict, refined: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tensors of block ``i``'s shard: each compressed linear's stored factors (under the checkpoint's own name
    stem), everything else of the block copied from the checkpoint — or, when the block was refined, the refined
    values of its norms and biases (``refined``: by name in the block, in the checkpoint's dtype)."""
    prefix = run.prefix(i)
    tensors: dict[str, Any] = {}
    compressed = set()
    for rel, result in results.items():
        ck = checkpoint_name(f"{prefix}.{rel}.weight", run.locations)
        assert ck is not None  # plan_run checked every block parameter
        compressed.add(ck)
        tensors.update(result.tensors(ck.removesuffix(".weight")))
    replaced = {checkpoint_name(f"{prefix}.{name}", run.locations): value for name, value in (refined or {}).items()}
    for ck in sorted(run.block_names[i] - compressed):
        tensors[ck] = replaced[ck] if ck in replaced else read_checkpoint_tensor(run.locations, ck)
    return tensors


def compress_blocks(run: Run, output: Output, on_block_done: Callable[[int], None] | None, show: bool) -> None:
    """Every unfinished block in order, then the LM head when asked (phases 3 to 5)."""
    start = output.progress["finished_blocks"]
    n_blocks = len(run.block_names)
    head_pending = run.settings.lm_head and not output.progress["head_done"]
    if start == n_blocks and not head_pending:
        return
    stream = calibration_stream(run, output)
    bar_blocks = _progress(n_blocks, "blocks", 0, not (show and output.writer))
    bar_blocks.update(start)
    for i in range(start, n_blocks):
        t_block, cpu_block = time.perf_counter(), time.process_time()
        bar = _progress(len(run.layout.linears), f"block {i}", 1, not (show and output.writer))
        results, refinement = compress_block(run, i, stream, bar)
        bar.close()
        prefix = run.prefix(i)
        reports = [
            {"block": i, "name": f"{prefix}.{rel}", "shape": list(r.shape), **r.report} for rel, r in results.items()
        ]
        timing = {"block": i, "seconds": time.perf_counter() - t_block, "cpu_seconds": time.process_time() - cpu_block}
        if refinement:
            timing["refine"] = refinement["report"]
        tensors = block_tensors(run, i, results, refinement.get("params"))
        output.save_block(i, tensors, reports, timing, stream)
        release_block(run.blocks[i])
        bar_blocks.update(1)
        if run.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if on_block_done is not None:
            on_block_done(i)
    bar_blocks.close()
    if head_pending:
        compress_lm_head(run, output, stream)


def head_grams(norm: Any, stream: CalibrationStream, anchored: bool) -> Grams:
    """The LM head's Gram matrices: of the final normed hidden states of the compressed model (``G'``), and for
    the anchored methods of the original model (``G``) and the cross Gram ``C``."""
    torch = require_torch()
    sums: list[Any] = [0, 0, 0]
    originals = stream.original if anchored else [None] * len(stream.hidden)
    with torch.no_grad():
        for hidden, original in zip(stream.hidden, originals or [], strict=True):
            x_shift = norm(hidden).reshape(-1, hidden.shape[-1]).to(torch.float64)
            sums[0] = sums[0] + x_shift.T @ x_shift
            if original is not None:
                x = norm(original).reshape(-1, original.shape[-1]).to(torch.float64)
                sums[1], sums[2] = sums[1] + x.T @ x, sums[2] + x.T @ x_shift
    if not anchored:
        return Grams(sums[0].cpu().numpy())
    return Grams(*(g.cpu().numpy() for g in sums))


def compress_lm_head(run: Run, output: Output, stream: CalibrationStream) -> None:
    """``--lm-head``: compress the LM head on the final normed hidden states of the compressed model (rank 0) and
    save it to its own shard."""
    torch = require_torch()
    t0, cpu0 = time.perf_counter(), time.process_time()
    head, name = load_lm_head(run.model, run.locations, run.device)
    norm = get_submodule(run.model, run.layout.final_norm).to(run.device)
    grams = head_grams(norm, stream, run.settings.anchored)
    mine = None
    if run.rank == 0:
        W = head.weight.detach().cpu().to(torch.float64).numpy()
        mine = compress_linear(W, checked_grams(grams, name), run.settings, run.factorize, name, run.solve_lowrank)
    result = share_result(mine, 0, run.world)
    head.to("meta")
    stem = (checkpoint_name(f"{name}.weight", run.locations) or f"{name}.weight").removesuffix(".weight")
    report = {"block": None, "name": name, "shape": list(result.shape), **result.report}
    timing = {"block": "lm_head", "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}
    output.save_head(result.tensors(stem), [report], timing)


# ----------------------------------------------------------------------------------------------------------
# Phase 6: finish
# ----------------------------------------------------------------------------------------------------------
def write_output_config(run: Run) -> list[str]:
    """The output's ``config.json`` (a compressed tied LM head untied) and the tokenizer and sentence-transformers
    files, copied next to the weights; returns their names (relative to the output directory)."""
    names = companion_files(run.model_dir)
    for name in names:
        target = os.path.join(run.out_dir, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if name == "config.json" and run.settings.lm_head and run.config.get("tie_word_embeddings"):
            write_json(target, {**run.config, "tie_word_embeddings": False})
        else:
            copy_file(os.path.join(run.model_dir, name), target)
    return names


def write_index(run: Run) -> None:
    """``model.safetensors.index.json``: tensor name -> shard, with the ARMOR metadata."""
    head = [HEAD_SHARD] if run.settings.lm_head else []
    weight_map, total = {}, 0
    for shard in [block_shard_name(i) for i in range(len(run.block_names))] + head + [REST_SHARD]:
        path = os.path.join(run.out_dir, shard)
        total += os.path.getsize(path)
        weight_map.update({name: shard for name in read_safetensors_header(path)[0]})
    index = {
        "metadata": {**shard_metadata(run.settings), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(os.path.join(run.out_dir, WEIGHTS_INDEX), index)


def build_report(run: Run, output: Output, t_start: float) -> dict[str, Any]:
    """``armor_report.json``: settings, inputs, per-layer metrics and per-block timings, the machine."""
    progress = output.progress
    return {
        "model_dir": os.path.abspath(run.model_dir),
        "settings": output.manifest["settings"],
        "inputs": output.manifest["inputs"],
        "architecture": run.config.get("model_type"),
        "world_size": run.world,
        "blocks": progress["blocks"],
        "layers": progress["layers"],
        "linears": len(progress["layers"]),
        "seconds_total_this_run": time.perf_counter() - t_start,
        "seconds_blocks": sum(b["seconds"] for b in progress["blocks"]),
        "seconds_refine": sum(b.get("refine", {}).get("seconds", 0.0) for b in progress["blocks"]),
        "cpu_seconds_blocks": sum(b["cpu_seconds"] for b in progress["blocks"]),
        "machine": machine_info(),
    }


def finish_run(run: Run, output: Output, t_start: float) -> dict[str, Any]:
    """Everything after the last block, each step repeatable with the same bytes: the rest shard, the output config,
    the index, the report, and the manifest marked complete (the run's last write). Returns the report."""
    from .hf import write_armor_config  # imports transformers: only once a run gets here

    if not output.writer:
        return {}
    output.write_shard(REST_SHARD, {name: read_checkpoint_tensor(run.locations, name) for name in run.rest_names})
    for name in write_output_config(run):
        output.record(name)
    write_index(run)
    output.record(WEIGHTS_INDEX)
    proxy = shard_metadata(run.settings)["proxy"]
    for name in write_armor_config(run.model_dir, run.out_dir, run.settings.block_size, run.settings.method, proxy):
        output.record(name)  # config.json made loadable by from_pretrained, and modeling_armor.py (toolkit.hf)
    report = build_report(run, output, t_start)
    report.update(write_error_plot(run.out_dir, report))  # armor_errors.png beside the report (toolkit.report)
    if "error_plot" in report:
        output.record(report["error_plot"])
    write_json(output.path(REPORT_FILE), report)
    output.record(REPORT_FILE)
    output.complete()
    return report


def compress_model(
    model_dir: str,
    out_dir: str,
    calib_text: str,
    settings: CompressSettings,
    resume: bool = False,
    on_block_done: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compress every block linear of ``model_dir`` into ``out_dir``; return the report (also written to
    ``out_dir/armor_report.json``).

    ``resume``: continue the run recorded in ``out_dir`` (same settings and inputs required) from its last finished
    block; the output files are bitwise identical to an uninterrupted run's. A finished run is checked and its
    report returned, with ``"already_complete": True``. ``on_block_done(i)`` is called after block ``i`` is durably
    saved (tests use it to interrupt a run). See the module docstring for the phases and what is guaranteed after a
    kill or a full disk.
    """
    t_start = time.perf_counter()
    run = plan_run(model_dir, out_dir, calib_text, settings, resume)
    locks: list[RunLock] = []

    def open_on_rank0() -> dict[str, Any]:
        manifest, lock = open_output(run, resume)
        locks.append(lock)
        return manifest

    manifest = on_rank0(open_on_rank0, run.rank, run.world)
    try:
        output = Output(run, manifest)
        if manifest["complete"]:
            if not output.writer:
                return {}
            with open(output.path(REPORT_FILE), encoding="utf-8") as fh:
                return {**json.load(fh), "already_complete": True}
        compress_blocks(run, output, on_block_done, progress)
        return finish_run(run, output, t_start)
    finally:
        for lock in locks:
            lock.release()


__all__ = ["BASELINES", "METHODS", "MANIFEST_FILE", "CompressSettings", "ArmorError", "compress_model"]

"""Sequential, block-by-block compression of a whole Hugging Face checkpoint (issue 5).

Pipeline (:func:`compress_model`):

1. Tokenise the calibration text into ``nsamples`` windows of ``seqlen`` tokens (deterministic, ``seed``).
2. Build the model with no block weights in memory (:func:`toolkit.models.load_model_skeleton`), run it up to
   its first transformer block and keep the block's inputs (hidden states and the keyword arguments the model
   passes to its blocks: attention mask, rotary position embeddings, ...), moved to ``device``.
3. For each block, in order: read its weights from the checkpoint shards onto ``device``
   (:func:`toolkit.models.load_block`). Inside it, for each *group* of linears (:mod:`toolkit.models`, e.g.
   q/k/v, then o, then the MLP input projections, then the MLP output projection): forward the block's inputs
   through the block with hooks that accumulate each linear's Gram matrix ``Xᵀ X`` (so a group sees the outputs
   of the already-compressed groups before it), compress each linear of the group (``factorize`` of the chosen
   backend, or a 2:4 baseline), and put ``Ŵ`` into the block.
4. Forward the inputs through the compressed block: its outputs are the next block's inputs.
5. Write the block's shard (spec §6 layout) atomically, then the hidden states entering the next block, then the
   progress file: that last write is what makes the block *finished* for ``--resume``. Release the block
   (:func:`toolkit.models.release_block`): only one block's weights are ever in memory, which is what lets a
   model larger than the machine's memory be compressed.

Embeddings and norms are copied through unchanged, and so is the LM head unless ``lm_head`` is set: then, after
the last block, the head is compressed on the final normed hidden states (its own shard; a tied head is untied in
the output ``config.json``). Every method writes the spec §6 layout
(``NAME.armor.A/B/values/index``); the plain 2:4 baselines are written with ``A = B = I``, so every output loads
the same way and file sizes compare fairly.

Several processes (``torchrun``): every rank runs the same forward passes; the linears of a group are dealt out
round-robin (linear ``j`` of the group to rank ``j mod world_size``), the owner broadcasts its result, and rank 0
writes the files. Results are identical to a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from armor_ref.baselines import BASELINES, run_baseline
from armor_ref.factorization import reconstruct
from armor_ref.objectives import hessian_loss, nowag_loss, relative_output_error

from .armor_format import armor_metadata, armor_tensors
from .errors import ArmorError
from .files import atomic_write, write_json, write_safetensors
from .models import (
    WEIGHTS_INDEX,
    Layout,
    blocks_of,
    checkpoint_name,
    copy_tokenizer_and_config,
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
    tensor_locations,
)
from .report import machine_info, write_error_plot

METHODS = ("armor-nowag", "armor-hessian", "sparsegpt", "wanda", "nowag-p", "magnitude")
PROGRESS_DIR = ".armor-progress"
STATE_FILE = "state.json"
REPORT_FILE = "armor_report.json"
REST_SHARD = "model-rest.safetensors"
HEAD_SHARD = "model-lm-head.safetensors"


def block_shard_name(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


@dataclass(frozen=True)
class CompressSettings:
    """Everything that determines the compressed output; a resumed run must use the same settings."""

    method: str
    nsamples: int = 64
    seqlen: int = 128
    block_size: int = 32
    sweeps: int | None = None  # None: the reference defaults (30 nowag / 20 hessian)
    seed: int = 0
    backend: str = "numpy"
    device: str = "cpu"
    batch_size: int = 8  # calibration sequences per forward pass
    lm_head: bool = False  # also compress the LM head (causal LMs)

    def identity(self) -> dict[str, Any]:
        """The settings that must match for ``--resume`` (``device`` and ``batch_size`` do not change results
        of the numpy backend, but are kept so a resumed run is exactly the interrupted one)."""
        return asdict(self)


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


# ----------------------------------------------------------------------------------------------------------
# One linear
# ----------------------------------------------------------------------------------------------------------
def compress_linear(
    W: np.ndarray, gram: np.ndarray, settings: CompressSettings, factorize: Callable | None = None
) -> LinearResult:
    """Compress one weight ``W`` (d_out, d_in) given its calibration Gram matrix ``Xᵀ X``.

    ``armor-*`` methods call ``factorize`` (the backend's, spec signature); baselines keep ``A = B = I``.
    The report holds the proxy losses (the method's own objective, of the start and of the result), the
    relative output error ``‖(W − Ŵ)Xᵀ‖² / ‖W Xᵀ‖²`` on the calibration data, and the seconds spent.
    """
    W = np.asarray(W, dtype=np.float64)
    t0 = time.perf_counter()
    b = settings.block_size
    if settings.method.startswith("armor-"):
        if factorize is None:
            from backends import get_factorize

            factorize = get_factorize(settings.backend, settings.device)
        proxy = settings.method.removeprefix("armor-")
        res = factorize(W, gram, proxy=proxy, block_size=b, sweeps=settings.sweeps, seed=settings.seed)
        out = LinearResult(np.asarray(res.A), np.asarray(res.B), np.asarray(res.S), np.asarray(res.M), proxy)
        report = {
            "init": res.init,
            "baseline_loss": float(res.baseline_loss),
            "loss": float(res.loss),
            "sweeps": int(res.sweeps),
        }
    else:
        S, M = run_baseline(settings.method, W, gram)
        d_out, d_in = W.shape
        eye = np.eye(b)
        out = LinearResult(np.tile(eye, (d_out // b, 1, 1)), np.tile(eye, (d_in // b, 1, 1)), S, M, "none")
        # the objectives ARMOR would start from, for comparison across methods
        report = {"nowag_loss": nowag_loss(W, S, np.diag(gram)), "hessian_loss": hessian_loss(W, S, gram)}
    seconds = time.perf_counter() - t0
    W_hat = out.W_hat()
    report["relative_output_error"] = relative_output_error(W, W_hat, gram)
    report["seconds"] = seconds
    out.report = report
    return out


# ----------------------------------------------------------------------------------------------------------
# Calibration data
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
        raise ArmorError(f"seqlen {seqlen} is too short")
    if len(ids) < body + 1:
        raise ArmorError(f"the calibration text has {len(ids)} tokens; need at least {body + 1}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - body + 1, size=nsamples)
    ids = np.asarray(ids, dtype=np.int64)
    windows = np.stack([ids[s : s + body] for s in starts])
    if wrap:
        windows = np.concatenate([np.full((nsamples, 1), cls_id), windows, np.full((nsamples, 1), sep_id)], axis=1)
    return windows


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
                    raise ArmorError(f"linear(s) {', '.join(missing)} were not called by the block's forward")
    finally:
        for h in handles:
            h.remove()
    return {name: g.cpu().numpy() for name, g in grams.items()}


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def shard_metadata(settings: CompressSettings, proxy: str) -> dict[str, str]:
    """Header metadata of every output shard: spec §6's keys plus the method and its sweep budget."""
    sweeps = "default" if settings.sweeps is None else str(settings.sweeps)
    return armor_metadata(settings.block_size, proxy, {"method": settings.method, "sweeps": sweeps})


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`toolkit.files.atomic_write`."""
    torch = require_torch()
    atomic_write(path, lambda fh: torch.save(obj, fh))


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


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------
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


def validate_inputs(
    model_dir: str, out_dir: str, calib_text: str, settings: CompressSettings, resume: bool
) -> tuple[dict, Layout]:
    """Check everything that can be checked before any output is written; raise one-line errors."""
    config = read_config(model_dir)
    layout = layout_of(config)
    tensor_locations(model_dir)  # weights present and readable
    if settings.method not in METHODS:
        raise ArmorError(f"unknown method {settings.method!r}; choose one of {', '.join(METHODS)}")
    if not os.path.isfile(calib_text):
        raise ArmorError(f"calibration text {calib_text!r} does not exist")
    if settings.nsamples <= 0 or settings.seqlen <= 0:
        raise ArmorError("--nsamples and --seqlen must be positive")
    if settings.block_size <= 0 or settings.block_size % 4:
        raise ArmorError(f"block size {settings.block_size} must be a positive multiple of 4")
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ArmorError("the output directory must differ from the model directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ArmorError(f"{out_dir!r} exists and is not a directory")
    if not resume and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ArmorError(f"output directory {out_dir!r} is not empty; pass --resume to continue it")
    require_device(settings.device)
    if settings.lm_head:
        if layout.final_norm is None:
            raise ArmorError(f"--lm-head: a {config.get('model_type')} encoder has no LM head to compress")
        vocab, hidden = config.get("vocab_size", 0), config.get("hidden_size", 0)
        if vocab % settings.block_size or hidden % settings.block_size:
            raise ArmorError(
                f"--lm-head: the head is {vocab}×{hidden}, not a multiple of the block size {settings.block_size}; "
                "leave the head dense or choose another --block-size"
            )
    if settings.method.startswith("armor-"):
        from backends import BackendUnavailable, get_factorize

        try:
            get_factorize(settings.backend, settings.device)
        except BackendUnavailable as exc:
            raise ArmorError(str(exc)) from None
    return config, layout


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

    ``resume``: continue from the last finished block recorded in ``out_dir`` (same settings required); the result
    is bitwise identical to an uninterrupted run. ``on_block_done(i)`` is called after block ``i`` is durably
    saved (tests use it to interrupt a run).
    """
    _, layout = validate_inputs(model_dir, out_dir, calib_text, settings, resume)
    torch = require_torch()
    rank, world = dist_rank_world()
    writer = rank == 0
    t_start = time.perf_counter()

    with open(calib_text, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    identity = {
        **settings.identity(),
        "calib_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "model_dir": os.path.abspath(model_dir),
    }
    progress_dir = os.path.join(out_dir, PROGRESS_DIR)
    state_path = os.path.join(progress_dir, STATE_FILE)
    state: dict[str, Any] = {"settings": identity, "finished_blocks": 0, "layers": [], "blocks": []}
    if resume and os.path.isfile(os.path.join(out_dir, WEIGHTS_INDEX)) and not os.path.isdir(progress_dir):
        with open(os.path.join(out_dir, REPORT_FILE), encoding="utf-8") as fh:
            return json.load(fh)  # already complete: nothing to do
    if resume and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
        if state["settings"] != identity:
            changed = sorted(k for k in identity if state["settings"].get(k) != identity[k])
            raise ArmorError(f"cannot resume: settings differ from the interrupted run ({', '.join(changed)})")

    model, layout, locations = load_model_skeleton(model_dir)
    device = forward_device(settings, world)
    tokenizer = load_tokenizer(model_dir)
    windows = calibration_windows(tokenizer, text, settings.nsamples, settings.seqlen, settings.seed)
    blocks = blocks_of(model, layout)
    names = module_names(model)
    factorize = None
    if settings.method.startswith("armor-"):
        from backends import get_factorize

        factorize = get_factorize(settings.backend, settings.device)

    if writer:
        os.makedirs(progress_dir, exist_ok=True)
        if state["finished_blocks"] == 0:
            copy_tokenizer_and_config(model_dir, out_dir)

    # inputs of the first block still to do: captured (cheap: embeddings only), or the saved hidden states
    batches = capture_block_inputs(model, blocks, windows, settings.batch_size, layout.kind == "causal")
    batches = to_device(batches, device)
    start_block = state["finished_blocks"]
    if start_block > 0:
        saved = torch.load(
            os.path.join(progress_dir, f"hidden-{start_block:05d}.pt"), weights_only=True, map_location=device
        )
        batches = [(h, kw) for h, (_, kw) in zip(saved, batches, strict=True)]

    written: set[str] = set()
    for i in range(start_block):  # tensors already in finished shards
        written.update(_names_in_block(model, blocks[i], names, locations, layout))

    n_linears = len(layout.linears)
    bar_blocks = _progress(len(blocks), "blocks", 0, not (progress and writer))
    bar_blocks.update(start_block)
    for i in range(start_block, len(blocks)):
        block = blocks[i]
        block_prefix = names[id(block)]
        t_block, cpu_block = time.perf_counter(), time.process_time()
        load_block(model, block, locations, device)
        bar_layers = _progress(n_linears, f"block {i}", 1, not (progress and writer))
        results: dict[str, LinearResult] = {}
        for group in layout.groups:
            linears = {rel: get_submodule(block, rel) for rel in group}
            grams = accumulate_grams(block, linears, batches)
            for j, rel in enumerate(group):
                owner = j % world
                mine = None
                if owner == rank:
                    W = linears[rel].weight.detach().cpu().to(torch.float64).numpy()
                    mine = compress_linear(W, grams[rel], settings, factorize)
                result = share_result(mine, owner, world)
                linears[rel].weight.data.copy_(torch.from_numpy(result.W_hat()))
                results[rel] = result
                bar_layers.set_postfix_str(f"{rel} rel.err {result.report['relative_output_error']:.4f}")
                bar_layers.update(1)
        bar_layers.close()
        with torch.no_grad():
            batches = [(run_block(block, h, kw).detach().clone(), kw) for h, kw in batches]

        layer_reports = []
        for rel, result in results.items():
            layer_reports.append(
                {"block": i, "name": f"{block_prefix}.{rel}", "shape": list(result.S.shape), **result.report}
            )
        if writer:
            shard = _block_tensors(model, block, names, locations, layout, results, block_prefix)
            write_safetensors(
                os.path.join(out_dir, block_shard_name(i)), shard, shard_metadata(settings, _proxy_of(settings))
            )
            if i + 1 < len(blocks) or settings.lm_head:
                atomic_torch_save([h.cpu() for h, _ in batches], os.path.join(progress_dir, f"hidden-{i + 1:05d}.pt"))
            state["finished_blocks"] = i + 1
            state["layers"].extend(layer_reports)
            state["blocks"].append(
                {"block": i, "seconds": time.perf_counter() - t_block, "cpu_seconds": time.process_time() - cpu_block}
            )
            write_json(state_path, state)
            old = os.path.join(progress_dir, f"hidden-{i:05d}.pt")
            if os.path.exists(old):
                os.remove(old)
        written.update(_names_in_block(model, block, names, locations, layout))
        release_block(block)
        bar_blocks.update(1)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if on_block_done is not None:
            on_block_done(i)
    bar_blocks.close()
    if settings.lm_head:
        written.add(_compress_lm_head(model, layout, locations, device, batches, settings, factorize, out_dir, state))

    report: dict[str, Any] = {}
    if writer:
        rest = {name: read_checkpoint_tensor(locations, name) for name in sorted(locations) if name not in written}
        write_safetensors(os.path.join(out_dir, REST_SHARD), rest, shard_metadata(settings, _proxy_of(settings)))
        report = {
            "model_dir": os.path.abspath(model_dir),
            "settings": identity,
            "architecture": read_config(model_dir).get("model_type"),
            "world_size": world,
            "blocks": state["blocks"],
            "layers": state["layers"],
            "linears": len(state["layers"]),
            "seconds_total_this_run": time.perf_counter() - t_start,
            "seconds_blocks": sum(b["seconds"] for b in state["blocks"]),
            "cpu_seconds_blocks": sum(b["cpu_seconds"] for b in state["blocks"]),
            "machine": machine_info(),
        }
        _write_index(out_dir, len(blocks), settings)
        from .hf import write_armor_config  # transformers' view of the directory (toolkit.hf)

        write_armor_config(model_dir, out_dir, settings.block_size, settings.method, _proxy_of(settings))
        report.update(write_error_plot(out_dir, report))  # armor_errors.png beside the report (toolkit.report)
        write_json(os.path.join(out_dir, REPORT_FILE), report)
        shutil.rmtree(progress_dir, ignore_errors=True)
    return report


def _compress_lm_head(
    model: Any,
    layout: Layout,
    locations: dict[str, str],
    device: str,
    batches: list[tuple[Any, dict]],
    settings: CompressSettings,
    factorize: Callable | None,
    out_dir: str,
    state: dict[str, Any],
) -> str:
    """``--lm-head``: compress the LM head on the final normed hidden states of the compressed model, write it
    to its own shard (rank 0) and untie it in the output ``config.json``. Returns the checkpoint name of the
    head's weight (not copied to the rest shard)."""
    torch = require_torch()
    rank, world = dist_rank_world()
    t0, cpu0 = time.perf_counter(), time.process_time()
    head, name = load_lm_head(model, locations, device)
    norm = get_submodule(model, layout.final_norm).to(device)
    gram: Any = 0
    with torch.no_grad():
        for hidden, _ in batches:
            x = norm(hidden).reshape(-1, hidden.shape[-1]).to(torch.float64)
            gram = gram + x.T @ x
    mine = None
    if rank == 0:
        W = head.weight.detach().cpu().to(torch.float64).numpy()
        mine = compress_linear(W, gram.cpu().numpy(), settings, factorize)
    result = share_result(mine, 0, world)
    stem = (checkpoint_name(f"{name}.weight", locations) or f"{name}.weight").removesuffix(".weight")
    if rank == 0:
        metadata = shard_metadata(settings, _proxy_of(settings))
        write_safetensors(os.path.join(out_dir, HEAD_SHARD), armor_tensors(stem, result), metadata)
        config_path = os.path.join(out_dir, "config.json")
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
        if config.get("tie_word_embeddings"):
            write_json(config_path, {**config, "tie_word_embeddings": False})
        state["layers"].append({"block": None, "name": name, "shape": list(result.S.shape), **result.report})
        state["blocks"].append(
            {"block": "lm_head", "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}
        )
    head.to("meta")
    return f"{stem}.weight"


def _proxy_of(settings: CompressSettings) -> str:
    return settings.method.removeprefix("armor-") if settings.method.startswith("armor-") else "none"


def _names_in_block(
    model: Any, block: Any, names: dict[int, str], locations: dict[str, str], layout: Layout
) -> set[str]:
    """Checkpoint tensor names that belong to ``block`` (parameters and persistent buffers)."""
    prefix = names[id(block)]
    out = set()
    for local, _ in list(block.named_parameters()) + list(block.named_buffers()):
        ck = checkpoint_name(f"{prefix}.{local}", locations)
        if ck is not None:
            out.add(ck)
    return out


def _block_tensors(
    model: Any,
    block: Any,
    names: dict[int, str],
    locations: dict[str, str],
    layout: Layout,
    results: dict[str, LinearResult],
    prefix: str,
) -> dict[str, Any]:
    """The tensors of one block's shard: spec §6 tensors for each compressed linear (under the checkpoint's own
    name stem), everything else copied from the checkpoint."""
    tensors: dict[str, Any] = {}
    compressed_weights = set()
    for rel, result in results.items():
        ck = checkpoint_name(f"{prefix}.{rel}.weight", locations)
        if ck is None:
            raise ArmorError(f"cannot find {prefix}.{rel}.weight in the checkpoint")
        compressed_weights.add(ck)
        tensors.update(armor_tensors(ck.removesuffix(".weight"), result))
    for ck in sorted(_names_in_block(model, block, names, locations, layout) - compressed_weights):
        tensors[ck] = read_checkpoint_tensor(locations, ck)
    return tensors


def _write_index(out_dir: str, n_blocks: int, settings: CompressSettings) -> None:
    """``model.safetensors.index.json``: tensor name -> shard, with the ARMOR metadata."""
    from safetensors import safe_open

    weight_map = {}
    total = 0
    head = [HEAD_SHARD] if settings.lm_head else []
    for shard in [block_shard_name(i) for i in range(n_blocks)] + head + [REST_SHARD]:
        path = os.path.join(out_dir, shard)
        total += os.path.getsize(path)
        with safe_open(path, framework="pt") as fh:
            for name in fh.keys():
                weight_map[name] = shard
    index = {
        "metadata": {**shard_metadata(settings, _proxy_of(settings)), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(os.path.join(out_dir, WEIGHTS_INDEX), index)


__all__ = ["BASELINES", "METHODS", "CompressSettings", "ArmorError", "compress_linear", "compress_model"]

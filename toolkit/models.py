"""Hugging Face checkpoint directories: what is in them and which linears ARMOR compresses, in which order.

A model directory holds ``config.json``, the weights (``model.safetensors`` or shards listed in
``model.safetensors.index.json``) and tokenizer files. Supported layouts (``config.json``'s ``model_type``):

* **BERT-style encoders** (``bert``, e.g. all-MiniLM-L6-v2): blocks ``encoder.layer.{i}``.
* **The Llama layout** (``llama``, ``qwen2``, ``qwen3``, ``mistral``): blocks ``model.layers.{i}``.

Inside a block the linears are compressed in *groups*, in forward order; the linears of one group read the same
input, and a group's input is captured after every earlier group of the block has been compressed:

====  =================================================  ==========================================
step  BERT                                               Llama layout
====  =================================================  ==========================================
1     attention.self.query / key / value                 self_attn.q_proj / k_proj / v_proj
2     attention.output.dense                             self_attn.o_proj
3     intermediate.dense                                 mlp.gate_proj / up_proj
4     output.dense                                       mlp.down_proj
====  =================================================  ==========================================

Embeddings and norms stay dense, and so does the LM head unless asked. ``torch``/``transformers`` are imported
lazily: the rest of the package imports without them.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import EXIT_FAILURE, ArmorError
from .files import read_safetensors_header
from .manifest import WEIGHTS_FILE, WEIGHTS_INDEX, verify_run

HF_INSTALL_HINT = "this command needs torch and transformers: pip install 'armor-ref[hf]'"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


@dataclass(frozen=True)
class Layout:
    """Where the transformer blocks of an architecture live and which linears they hold, in compression order."""

    kind: str  # "encoder" or "causal"
    blocks_path: str  # attribute path of the block list inside the loaded model
    groups: tuple[tuple[str, ...], ...]  # linears (relative to the block) per group, in forward order
    final_norm: str | None = None  # causal LMs: the norm between the last block and the LM head

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


BERT_LAYOUT = Layout(
    kind="encoder",
    blocks_path="encoder.layer",
    groups=(
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
)
LLAMA_LAYOUT = Layout(
    kind="causal",
    blocks_path="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    final_norm="model.norm",
)
ARMOR_MODEL_TYPE_PREFIX = "armor_"  # model_type of a compressed directory: armor_<source model_type> (toolkit.hf)
LAYOUTS: dict[str, Layout] = {
    "bert": BERT_LAYOUT,
    "llama": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
}


# ----------------------------------------------------------------------------------------------------------
# Directory inspection (no torch needed)
# ----------------------------------------------------------------------------------------------------------
def read_config(model_dir: str) -> dict[str, Any]:
    """``config.json`` of ``model_dir``; :class:`ArmorError` when the directory or the file is missing/bad."""
    if not os.path.isdir(model_dir):
        raise ArmorError(f"model directory {model_dir!r} does not exist", "check the path")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ArmorError(f"{model_dir!r} has no config.json; expected a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ArmorError(f"cannot read {path}: {exc}", "restore the model's config.json") from None
    if not isinstance(config, dict):
        raise ArmorError(f"{path} does not hold a JSON object", "restore the model's config.json")
    return config


def dense_model_type(config: dict[str, Any]) -> Any:
    """The config's ``model_type``, for a compressed directory (``armor_llama``) the dense model's (``llama``)."""
    model_type = config.get("model_type")
    return model_type.removeprefix(ARMOR_MODEL_TYPE_PREFIX) if isinstance(model_type, str) else model_type


def armor_quantization(config: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` of a compressed directory's config (written by :mod:`toolkit.hf`);
    :class:`ArmorError` when the config is not a compressed directory's."""
    from .armor_format import ARMOR_FORMAT  # not at the top: toolkit.hf imports this module (see its docstring)

    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != ARMOR_FORMAT:
        raise ArmorError(
            "not a compressed directory: its config.json has no ARMOR quantization_config",
            "give a directory written by armor-ref compress",
        )
    return quantization


def layout_of(config: dict[str, Any]) -> Layout:
    """The :class:`Layout` of a config's (dense) ``model_type``; :class:`ArmorError` for unsupported
    architectures."""
    model_type = dense_model_type(config)
    if model_type not in LAYOUTS:
        raise ArmorError(
            f"unsupported architecture {model_type!r}; supported model_type values: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory: the shards named in ``model.safetensors.index.json``, or
    ``model.safetensors``. :class:`ArmorError` when there are none."""
    index = os.path.join(model_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        weight_map = read_weight_map(index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise ArmorError(f"{index} names missing shard(s): {', '.join(missing)}", "restore the missing shard files")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    raise ArmorError(
        f"{model_dir!r} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}", "give a Hugging Face directory saved as safetensors"
    )


def read_weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``model.safetensors.index.json``."""
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
    except (OSError, UnicodeDecodeError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ArmorError(f"cannot read {index}: {exc}", "restore the checkpoint's index file") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and os.path.basename(v) == v and v for k, v in weight_map.items()
    ):
        raise ArmorError(f"{index}: weight_map is not a map of tensor names to shard files", "restore the index file")
    return weight_map


def tensor_locations(model_dir: str) -> dict[str, str]:
    """Map every tensor name of the checkpoint to the safetensors file holding it. Every shard's header is read and
    checked against its file size (a truncated or corrupted shard is an error here, before anything runs). In a
    sharded checkpoint the index decides, as it does for Hugging Face's loader: its tensors, each of which must be
    in the shard it names (a tensor a shard holds but the index omits is not part of the checkpoint)."""
    in_files = {}
    for path in weight_files(model_dir):
        in_files.update({name: path for name in read_safetensors_header(path)[0]})
    index = os.path.join(model_dir, WEIGHTS_INDEX)
    if not os.path.isfile(index):
        return in_files
    locations = {name: os.path.join(model_dir, shard) for name, shard in sorted(read_weight_map(index).items())}
    for name, path in locations.items():
        if in_files.get(name) != path:
            raise ArmorError(
                f"{index} lists {name} in {os.path.basename(path)}, but that shard does not hold it",
                "restore the checkpoint (its index and shards come from different saves)",
            )
    return locations


def checkpoint_shapes(locations: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """The shape of every checkpoint tensor, from the shards' headers (each read once)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(locations.values())):
        shapes.update({name: info.shape for name, info in read_safetensors_header(path)[0].items()})
    return shapes


def read_checkpoint_tensor(locations: dict[str, str], name: str) -> Any:
    """One tensor of the checkpoint (a torch tensor, its stored dtype), read from the file holding it."""
    from safetensors import safe_open

    with safe_open(locations[name], framework="pt") as fh:
        return fh.get_tensor(name)


def companion_files(model_dir: str) -> list[str]:
    """The files that travel with the weights, relative to ``model_dir``: ``config.json``, whatever tokenizer files
    exist, and the files of sentence-transformers module folders (such as ``1_Pooling/config.json``)."""
    names = [name for name in ("config.json", *TOKENIZER_FILES) if os.path.isfile(os.path.join(model_dir, name))]
    for entry in sorted(os.listdir(model_dir)):  # sentence-transformers module folders such as 1_Pooling
        folder = os.path.join(model_dir, entry)
        if os.path.isdir(folder) and entry[:1].isdigit() and "_" in entry:
            for root, _, files in sorted(os.walk(folder)):
                names += [os.path.relpath(os.path.join(root, f), model_dir) for f in sorted(files)]
    return names


# ----------------------------------------------------------------------------------------------------------
# torch / transformers
# ----------------------------------------------------------------------------------------------------------
def require_torch() -> Any:
    """Import and return ``torch``; :class:`ArmorError` with the install hint when it is missing."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise ArmorError(HF_INSTALL_HINT) from None
    return torch


def require_device(device: str) -> None:
    """:class:`ArmorError` (one line) unless torch can allocate on ``device`` here."""
    torch = require_torch()
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArmorError(
            f"device {device!r} is not usable here ({reason})", "try --device cpu", exit_code=EXIT_FAILURE
        ) from None


def _offline() -> None:
    """Never download; keep transformers' own progress bars off our stderr."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()


def model_class(layout: Layout) -> Any:
    """``AutoModel`` for encoders, ``AutoModelForCausalLM`` for causal LMs."""
    require_torch()
    import transformers

    return transformers.AutoModel if layout.kind == "encoder" else transformers.AutoModelForCausalLM


def load_model_skeleton(model_dir: str) -> tuple[Any, Layout, dict[str, str]]:
    """The model with **no block weights in memory**, for streaming one block at a time (:func:`load_block`).

    The model is built on the ``meta`` device (no storage). Everything outside the blocks (embeddings, final norm,
    rotary tables, pooler) is then materialised on the CPU in float32: parameters read from the checkpoint,
    buffers recomputed by transformers' own initialiser. The LM head (output embeddings, as large as the input
    embeddings) and parameters the checkpoint lacks stay on ``meta``: nothing before the first block needs them.
    Returns ``(model, layout, locations)`` with ``locations`` the checkpoint's tensor name -> file map.
    """
    config = read_config(model_dir)
    layout = layout_of(config)
    locations = tensor_locations(model_dir)
    torch = require_torch()
    _offline()
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            model = model_class(layout).from_config(hf_config, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; report one line
        raise ArmorError(f"cannot build {model_dir!r} with transformers: {str(exc).splitlines()[0]}") from None
    model.eval()
    in_blocks = {id(m) for block in blocks_of(model, layout) for m in block.modules()}
    head = model.get_output_embeddings()
    if head is not None:
        in_blocks.add(id(head))
    outside = [(name, m) for name, m in model.named_modules() if id(m) not in in_blocks]
    _materialise(model, outside, locations, "cpu", required=False)
    return model, layout, locations


def load_block(model: Any, block: Any, locations: dict[str, str], device: str) -> None:
    """Read one block's weights from the checkpoint onto ``device`` (float32), in place of its ``meta`` tensors."""
    prefix = module_names(model)[id(block)]
    _materialise(model, [(f"{prefix}.{n}" if n else prefix, m) for n, m in block.named_modules()], locations, device)


def load_lm_head(model: Any, locations: dict[str, str], device: str) -> tuple[Any, str]:
    """The LM head (``nn.Linear``) with its weight read onto ``device`` (float32), and its qualified name. A head
    tied to the input embeddings (no weight of its own in the checkpoint) gets a copy of the embeddings."""
    torch = require_torch()
    head = model.get_output_embeddings()
    name = module_names(model)[id(head)]
    if checkpoint_name(f"{name}.weight", locations) is None:
        tied = model.get_input_embeddings().weight.detach().to(device=device, dtype=torch.float32).clone()
        head.weight = torch.nn.Parameter(tied, requires_grad=False)
    else:
        _materialise(model, [(name, head)], locations, device)
    return head, name


def release_block(block: Any) -> None:
    """Drop a block's storage (back to ``meta``): at most one block is in memory at a time.

    glibc keeps freed heap memory for reuse, so without ``malloc_trim`` the resident size would still creep up
    block by block (measured: about 30 MB per 1024-wide Llama block); elsewhere the trim is skipped."""
    block.to("meta")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _materialise(
    model: Any, modules: list[tuple[str, Any]], locations: dict[str, str], device: str, required: bool = True
) -> None:
    """Give ``modules`` (qualified name, module; not recursed into) real tensors on ``device``: own buffers
    recomputed by the model's initialiser, own parameters read from the checkpoint. ``required``: a parameter
    missing from the checkpoint is an error (else it stays on ``meta``)."""
    torch = require_torch()
    for qualified, module in modules:
        if any(b is not None for b in module.buffers(recurse=False)):
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None:
                    setattr(module, name, torch.empty_like(buf, device=device))  # keeps its persistence flag
            with torch.no_grad():
                model._init_weights(module)  # transformers >= 5 recomputes rotary tables, position ids, ...
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{qualified}.{name}" if qualified else name
            ck = checkpoint_name(full, locations)
            if ck is None:
                if required:
                    raise ArmorError(f"the checkpoint lacks {full}")
                continue
            value = read_checkpoint_tensor(locations, ck).to(device=device, dtype=torch.float32)
            if tuple(value.shape) != tuple(param.shape):
                raise ArmorError(f"{ck} has shape {tuple(value.shape)}, the config expects {tuple(param.shape)}")
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def load_tokenizer(model_dir: str) -> Any:
    """The directory's tokenizer (fast when available), offline."""
    require_torch()
    _offline()
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ArmorError(f"cannot load the tokenizer of {model_dir!r}: {str(exc).splitlines()[0]}") from None


def get_submodule(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path = "a.b.c"``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def blocks_of(model: Any, layout: Layout) -> Any:
    """The ``ModuleList`` of transformer blocks. For a bare ``AutoModel`` (no task head) the path may lack a
    leading ``model.``; both are tried."""
    for path in (layout.blocks_path, layout.blocks_path.split(".", 1)[-1]):
        try:
            return get_submodule(model, path)
        except AttributeError:
            continue
    raise ArmorError(f"the loaded model has no {layout.blocks_path!r}")


def module_names(model: Any) -> dict[int, str]:
    """``id(module) -> qualified name`` within ``model``."""
    return {id(m): name for name, m in model.named_modules()}


def checkpoint_name(param_name: str, checkpoint_names: set[str] | dict[str, str]) -> str | None:
    """The checkpoint tensor name of a model parameter: the same name, or one that ends with it after a prefix
    (``bert.encoder…`` for a model loaded without the ``bert.`` prefix), or the name without the model's own
    prefix. ``None`` when nothing matches."""
    if param_name in checkpoint_names:
        return param_name
    candidates = [n for n in checkpoint_names if n.endswith("." + param_name)]
    if len(candidates) == 1:
        return candidates[0]
    parts = param_name.split(".")
    for i in range(1, len(parts)):
        tail = ".".join(parts[i:])
        if tail in checkpoint_names:
            return tail
    return None


def load_model(model_dir: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """Load a model directory, dense or compressed, with transformers' own ``from_pretrained`` (the one load path;
    :mod:`toolkit.hf` teaches it ARMOR directories): ``AutoModel`` for encoders, ``AutoModelForCausalLM`` for
    causal LMs, in ``dtype`` on ``device``, eval mode, offline. In a compressed directory's model the factorized
    linears are :class:`backends.torch.inference.ArmorLinear` modules (``y = A (S (B x)) + bias``): dense 2:4 cores
    on the CPU, semi-structured 2:4 cores (cuSPARSELt/CUTLASS) on CUDA in ``float16``/``bfloat16``.
    :class:`ArmorError` (one line) when a tensor the model needs is missing or has the wrong shape.

    A compress run is loaded only after :func:`toolkit.manifest.verify_run` has checked that it is finished and its
    files match the sha256 the run recorded (``from_pretrained`` checks that too, in :mod:`toolkit.hf`; here it
    comes first so that its error is the one reported)."""
    verify_run(model_dir)
    torch = require_torch()
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ArmorError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    require_device(device)
    layout = layout_of(read_config(model_dir))
    weight_files(model_dir)
    _offline()
    from .hf import register

    register()
    try:
        model, info = model_class(layout).from_pretrained(
            model_dir, local_files_only=True, dtype=torch_dtype, output_loading_info=True
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; report one line
        raise ArmorError(f"cannot load {model_dir!r} with transformers: {str(exc).splitlines()[0]}") from None
    lacking = sorted(info["missing_keys"]) + sorted(str(m[0]) for m in info["mismatched_keys"])
    if lacking:
        raise ArmorError(
            f"{model_dir!r} lacks {len(lacking)} tensor(s) of the right shape for its model, e.g. {lacking[0]}",
            "write the directory again (armor-ref compress, or save_pretrained)",
        )
    return model.to(device).eval()

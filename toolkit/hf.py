"""ARMOR directories in transformers: ``from_pretrained`` loads them, and refuses them when it cannot.

What ``armor-ref compress`` writes into the output's ``config.json`` (:func:`armor_config`):

* ``model_type`` ``armor_<source type>`` (``armor_bert``, ``armor_llama``, …) and ``architectures``
  ``Armor<source class>``: a type transformers does not know, so that **plain transformers refuses the directory**
  instead of loading its factorized linears as randomly initialised ``.weight`` s (what an unknown
  ``quantization_config`` alone would do: transformers only warns and skips it);
* ``quantization_config``: ``quant_method`` ``armor``, the format version, the block size, the exact modules stored
  as ARMOR factors (``NAME.armor.A/B/values/index``; everything else is dense), the method and its proxy, and the
  dense model's type, classes and dtype (for ``armor-ref export-dense``);
* ``auto_map`` naming the classes of :data:`REMOTE_CODE_FILE`, a few lines that ``import armor_ref``: with
  ``trust_remote_code=True`` transformers runs it and needs no import from the user; without it (and without the
  import) transformers stops with "… contains custom code which must be executed to correctly load the model …
  pass the argument ``trust_remote_code=True``", and a machine without the armor-ref package is told to install it.

What :func:`register` adds to transformers (run when this module is imported, which ``import armor_ref`` does as
soon as transformers is imported, see its docstring):

* for each supported architecture (:data:`toolkit.models.LAYOUTS`), a config class ``Armor<Config>`` (the
  source's own config class with the ``armor_`` model type) and model classes ``Armor<Model>`` for the Auto classes
  of :data:`AUTO_CLASSES` that the architecture has, each a thin subclass of transformers' own class;
* the quantization method ``armor`` (:class:`ArmorQuantizationConfig`, :class:`ArmorHfQuantizer`): before the
  weights load, exactly the listed ``nn.Linear`` modules become :class:`~backends.torch.inference.ArmorLinear`
  placeholders whose state-dict names are the checkpoint's (``NAME.armor.*``, ``NAME.bias``); after, their cores
  are unpacked — dense on the CPU, semi-structured 2:4 on CUDA in float16/bfloat16.

What a model type of our own costs: tools that look a model up by ``model_type`` (vLLM, TGI, PEFT's default LoRA
targets, GGUF converters) do not recognise ``armor_llama``; they could not run the factors anyway.
``armor-ref export-dense`` (:mod:`toolkit.export`) is the escape hatch: a plain checkpoint of ``Ŵ`` that loads
everywhere at dense cost.

Import order. ``import armor_ref`` imports this module when transformers is (or gets) imported, possibly while a
module of the project is half-way through importing ``armor_ref``: so at module level this imports, from the
project, only modules that never import ``armor_ref`` (``errors``, ``files``, ``manifest``, ``models``); the format
(``armor_format``) and ``ArmorLinear`` are imported where they are used.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import ArmorError
from .files import atomic_write, write_json
from .manifest import verify_run
from .models import (
    ARMOR_MODEL_TYPE_PREFIX,
    LAYOUTS,
    checkpoint_name,
    checkpoint_shapes,
    dense_model_type,
    get_submodule,
    read_checkpoint_tensor,
    read_config,
    tensor_locations,
    weight_files,
)

QUANT_METHOD = "armor"  # the quantization method's name is the format's (toolkit.armor_format.ARMOR_FORMAT)
REMOTE_CODE_FILE = "modeling_armor.py"
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
)
_CLASS_PREFIX = "Armor"
_REGISTERED: dict[str, dict[str, type]] = {}  # armor model type -> {"AutoConfig": config class, auto name: class}


# ----------------------------------------------------------------------------------------------------------
# config.json and the remote-code file
# ----------------------------------------------------------------------------------------------------------
def armor_config(source: dict[str, Any], quantization: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of an ARMOR directory: the dense model's ``source`` config with the ``armor_`` model type
    and classes, ``quantization`` (:func:`quantization_config`) and the ``auto_map`` of :data:`REMOTE_CODE_FILE`.
    Idempotent: an ARMOR config comes back unchanged but for ``quantization``."""
    base = source["model_type"].removeprefix(ARMOR_MODEL_TYPE_PREFIX)
    architectures = [a.removeprefix(_CLASS_PREFIX) for a in source.get("architectures") or []]
    return {
        **source,
        "model_type": ARMOR_MODEL_TYPE_PREFIX + base,
        "architectures": [_CLASS_PREFIX + a for a in architectures],
        "quantization_config": quantization,
        "auto_map": remote_auto_map(base),
    }


def quantization_config(
    modules: list[str],
    block_size: int,
    method: str,
    proxy: str,
    dense: dict[str, Any],
    lowrank: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` of an ARMOR directory (:class:`ArmorQuantizationConfig`'s fields). ``modules``:
    the checkpoint name stems of every factorized linear; ``lowrank``: those of them stored as low-rank factors
    (``NAME.lowrank.U/V``), with their ranks (the key is absent when there are none; the others are ARMOR factors);
    ``dense``: the source's ``model_type``, ``architectures`` and weight ``dtype``, and ``max_shard_bytes`` (its
    largest shard, ``None`` when it was one file). A reader that does not know ``lowrank`` refuses such a directory
    (it looks for ARMOR tensors of every listed module) instead of loading it wrong."""
    from .armor_format import ARMOR_VERSION

    config = {
        "quant_method": QUANT_METHOD,
        "format_version": ARMOR_VERSION,
        "block_size": block_size,
        "modules": sorted(modules),
        "method": method,
        "proxy": proxy,
        "dense": dense,
    }
    if lowrank:
        config["lowrank"] = dict(sorted(lowrank.items()))
    return config


def auto_classes_of(base_type: str) -> tuple[str, ...]:
    """The Auto classes (of :data:`AUTO_CLASSES`) transformers has a class for, for model type ``base_type``."""
    base_config = CONFIG_MAPPING[base_type]
    return tuple(name for name in AUTO_CLASSES if base_config in getattr(transformers, name)._model_mapping)


def remote_auto_map(base_type: str) -> dict[str, str]:
    """``auto_map`` of an ARMOR directory of ``base_type``: every registered Auto class → :data:`REMOTE_CODE_FILE`."""
    module = REMOTE_CODE_FILE.removesuffix(".py")
    names = _class_names(base_type)
    return {"AutoConfig": f"{module}.{names['AutoConfig']}"} | {
        auto: f"{module}.{names[auto]}" for auto in auto_classes_of(base_type)
    }


def remote_code(base_type: str) -> str:
    """The text of :data:`REMOTE_CODE_FILE` for an ARMOR directory of ``base_type``: it imports ``armor_ref`` (which
    registers everything) and subclasses the registered classes, so that transformers' remote-code machinery has
    classes of its own to attach to (and copies this file, not the package, when the model is saved again)."""
    armor_type = ARMOR_MODEL_TYPE_PREFIX + base_type
    names = _class_names(base_type)
    lines = [
        f'"""The transformers classes of an ARMOR-compressed {base_type} checkpoint (written by armor-ref).',
        "",
        "The linears listed in config.json's quantization_config are stored as ARMOR factors (NAME.armor.A, .B,",
        ".values, .index), which transformers alone cannot load. With the armor-ref package installed, either",
        "",
        "    import armor_ref                                    # before from_pretrained",
        "    model = AutoModel.from_pretrained(DIRECTORY)",
        "",
        "or let transformers run this file, which does the same import:",
        "",
        "    model = AutoModel.from_pretrained(DIRECTORY, trust_remote_code=True)",
        "",
        "`armor-ref export-dense DIRECTORY -o DENSE_DIRECTORY` writes a plain checkpoint that loads anywhere.",
        '"""',
        "",
        "import armor_ref  # noqa: F401 - registers the armor model types and quantization method with transformers",
        "from transformers.models.auto import modeling_auto",
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING",
        "",
        "",
        f"class {names['AutoConfig']}(CONFIG_MAPPING[{armor_type!r}]):",
        "    pass",
    ]
    for auto in auto_classes_of(base_type):
        mapping = _MAPPING_CONSTANTS[auto]
        lines += [
            "",
            "",
            f"class {names[auto]}(modeling_auto.{mapping}[CONFIG_MAPPING[{armor_type!r}]]):",
            f"    config_class = {names['AutoConfig']}",
        ]
    return "\n".join(lines) + "\n"


_MAPPING_CONSTANTS = {
    "AutoModel": "MODEL_MAPPING",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING",
}


def write_remote_code(directory: str, base_type: str) -> None:
    """Write :data:`REMOTE_CODE_FILE` into ``directory`` (atomically)."""
    text = remote_code(base_type)
    atomic_write(os.path.join(directory, REMOTE_CODE_FILE), lambda fh: fh.write(text), binary=False)


def write_armor_config(model_dir: str, out_dir: str, block_size: int, method: str, proxy: str) -> list[str]:
    """Finish a compressed directory for transformers: turn the dense ``config.json`` copied into ``out_dir`` into
    an ARMOR one (:func:`armor_config`; the modules are the ARMOR stems of ``out_dir``'s index, the dense facts are
    read from the source ``model_dir``) and write :data:`REMOTE_CODE_FILE` beside it. Safe to repeat, to the same
    bytes. Returns the names written."""
    path = os.path.join(out_dir, "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    from .armor_format import armor_stems, lowrank_stems

    locations = tensor_locations(out_dir)
    shapes = checkpoint_shapes(locations)
    lowrank = {stem: shapes[stem + ".lowrank.U"][1] for stem in lowrank_stems(locations)}
    modules = armor_stems(locations) + sorted(lowrank)
    source = read_config(model_dir)
    dense = {
        "model_type": source["model_type"],
        "architectures": source.get("architectures") or [],
        "dtype": _stored_dtype(tensor_locations(model_dir), modules),
        "max_shard_bytes": _max_shard_bytes(model_dir),
    }
    config = armor_config(config, quantization_config(modules, block_size, method, proxy, dense, lowrank))
    write_json(path, config)
    write_remote_code(out_dir, dense_model_type(config))
    return ["config.json", REMOTE_CODE_FILE]


def _stored_dtype(locations: dict[str, str], modules: list[str]) -> str:
    """The torch dtype name (``float32``, ``bfloat16``, …) of the dense weights of ``modules`` as stored in the
    checkpoint (the first one it holds: a tied LM head has none of its own)."""
    names = (checkpoint_name(f"{m}.weight", locations) for m in modules)
    tensor = read_checkpoint_tensor(locations, next(n for n in names if n is not None))
    return str(tensor.dtype).removeprefix("torch.")


def _max_shard_bytes(model_dir: str) -> int | None:
    """The size of a sharded checkpoint's largest shard; ``None`` for a single weights file."""
    files = weight_files(model_dir)
    return max(os.path.getsize(f) for f in files) if len(files) > 1 else None


def _class_names(base_type: str) -> dict[str, str]:
    """``{"AutoConfig": "ArmorBertConfig", "AutoModel": "ArmorBertModel", …}``: the source classes' names with the
    ``Armor`` prefix."""
    base_config = CONFIG_MAPPING[base_type]
    names = {"AutoConfig": _CLASS_PREFIX + base_config.__name__}
    for auto in auto_classes_of(base_type):
        names[auto] = _CLASS_PREFIX + getattr(transformers, auto)._model_mapping[base_config].__name__
    return names


# ----------------------------------------------------------------------------------------------------------
# The quantization method
# ----------------------------------------------------------------------------------------------------------
class ArmorQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of an ARMOR directory (see :func:`quantization_config` for the fields)."""

    def __init__(
        self,
        modules: list[str] | None = None,
        block_size: int = 32,
        format_version: str | None = None,
        method: str = "",
        proxy: str = "",
        dense: dict[str, Any] | None = None,
        lowrank: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        from .armor_format import ARMOR_VERSION

        self.quant_method = QUANT_METHOD
        self.format_version = str(format_version or ARMOR_VERSION)
        self.block_size = int(block_size)
        self.modules = list(modules or [])
        self.method = method
        self.proxy = proxy
        self.dense = dict(dense or {})
        if lowrank:  # absent from ARMOR-only configs, so that those are written back as they were
            self.lowrank = {str(k): int(v) for k, v in lowrank.items()}
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():  # fields of a later version are kept (and written back)
            setattr(self, key, value)
        if self.format_version != ARMOR_VERSION:
            raise ValueError(
                f"this checkpoint uses ARMOR format version {self.format_version}; this armor-ref reads version "
                f"{ARMOR_VERSION}: install the armor-ref that wrote it"
            )
        if not self.modules:
            raise ValueError("the ARMOR quantization_config lists no modules")


class ArmorHfQuantizer(HfQuantizer):
    """Loads ARMOR directories: the listed linears become :class:`ArmorLinear` placeholders — or, for those listed
    in ``lowrank``, :class:`~backends.torch.lowrank.LowRankLinear` ones of the recorded rank — before the weights are
    read (checked against the checkpoint first: every listed module has its tensors and no other module has any),
    and the ARMOR cores are unpacked after. It cannot compress a dense model on load (``armor-ref compress`` does
    that)."""

    requires_calibration = True  # pre-quantized checkpoints only

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: Any = None, **kwargs: Any) -> Any:
        from backends.torch.inference import ArmorLinear
        from backends.torch.lowrank import LowRankLinear

        config = self.quantization_config
        stems = set(config.modules)
        ranks = getattr(config, "lowrank", {})
        if checkpoint_files:  # a compress run must be finished and unaltered (toolkit.manifest)
            verify_run(os.path.dirname(str(checkpoint_files[0])))
        stored = _stored_shapes(checkpoint_files or [])
        if stored is not None:
            _check_checkpoint(stems, set(ranks), stored)
        replaced: set[str] = set()
        for name, module in list(model.named_modules()):
            stem = checkpoint_name(name, stems) if name else None
            if stem is None or stem in replaced:
                continue
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name} is listed as an ARMOR module but is a {type(module).__name__}")
            weight = module.weight
            shape = {"bias": module.bias is not None, "dtype": weight.dtype, "device": weight.device}
            try:
                if stem in ranks:
                    new = LowRankLinear.empty(module.out_features, module.in_features, ranks[stem], **shape)
                else:
                    new = ArmorLinear.empty(module.out_features, module.in_features, config.block_size, **shape)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            parent, _, child = name.rpartition(".")
            setattr(get_submodule(model, parent) if parent else model, child, new)
            replaced.add(stem)
        # a listed module the model lacks is fine only outside the loaded part (a causal LM's head when the bare
        # AutoModel is loaded); one inside it would be left with random weights
        inside = {name for name, _ in model.named_children()} | {getattr(model, "base_model_prefix", "")}
        lost = sorted(s for s in stems - replaced if s.split(".")[0] in inside)
        if lost:
            raise ValueError(
                f"{len(lost)} ARMOR module(s) listed in quantization_config are not modules of "
                f"{type(model).__name__}, e.g. {lost[0]}"
            )
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from backends.torch.inference import ArmorLinear

        for module in model.modules():
            if isinstance(module, ArmorLinear):
                module.unpack()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _stored_shapes(checkpoint_files: list[str]) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape over the safetensors checkpoint files (``None`` for other formats)."""
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return None
    shapes = {}
    for path in checkpoint_files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def _check_checkpoint(stems: set[str], lowrank: set[str], stored: dict[str, tuple[int, ...]]) -> None:
    """ValueError unless every listed module has its tensors (the two low-rank factors for those in ``lowrank``, the
    four ARMOR tensors for the others), and no unlisted one has any (it would otherwise be loaded with a random
    weight)."""
    from .armor_format import ARMOR_SUFFIXES, LOWRANK_SUFFIXES, armor_stems, lowrank_stems

    for stem in sorted(stems):
        suffixes = LOWRANK_SUFFIXES if stem in lowrank else ARMOR_SUFFIXES
        missing = [stem + s for s in suffixes if stem + s not in stored]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[0]}, listed in quantization_config.modules")
    for kind, found, listed in (
        ("ARMOR tensors", armor_stems(stored), stems - lowrank),
        ("low-rank factors", lowrank_stems(stored), lowrank),
    ):
        unlisted = sorted(set(found) - listed)
        if unlisted:
            raise ValueError(f"the checkpoint holds {kind} of {unlisted[0]}, which quantization_config omits")


# ----------------------------------------------------------------------------------------------------------
# The model types
# ----------------------------------------------------------------------------------------------------------
class ArmorModelMixin:
    """Mixed into every registered ``Armor<Model>`` class: ``save_pretrained`` also writes :data:`REMOTE_CODE_FILE`
    (and its ``auto_map``), so that a saved ARMOR model loads the same ways as a compressed directory."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        base = dense_model_type(self.config.to_dict())
        self.config.auto_map = remote_auto_map(base)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(str(save_directory), base)
        return result


def register() -> None:
    """Teach transformers the ARMOR model types and the ``armor`` quantization method (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(ArmorQuantizationConfig)
        register_quantizer(QUANT_METHOD)(ArmorHfQuantizer)
    for base_type in LAYOUTS:
        if ARMOR_MODEL_TYPE_PREFIX + base_type not in _REGISTERED:
            _register_architecture(base_type)


def _register_architecture(base_type: str) -> None:
    """``Armor<Config>`` with model type ``armor_<base_type>`` and ``Armor<Model>`` for each Auto class."""
    armor_type = ARMOR_MODEL_TYPE_PREFIX + base_type
    names = _class_names(base_type)
    base_config = CONFIG_MAPPING[base_type]
    doc = f"{base_config.__name__} of an ARMOR-compressed checkpoint (model type {armor_type!r})."
    config_class = type(
        names["AutoConfig"], (base_config,), {"model_type": armor_type, "__module__": __name__, "__doc__": doc}
    )
    transformers.AutoConfig.register(armor_type, config_class, exist_ok=True)
    classes: dict[str, type] = {"AutoConfig": config_class}
    for auto in auto_classes_of(base_type):
        auto_class = getattr(transformers, auto)
        base_model = auto_class._model_mapping[base_config]
        doc = f"{base_model.__name__} whose listed linears are ARMOR factors (see toolkit.hf)."
        attrs = {"config_class": config_class, "__module__": __name__, "__doc__": doc}
        model_class = type(names[auto], (ArmorModelMixin, base_model), attrs)
        auto_class.register(config_class, model_class, exist_ok=True)
        classes[auto] = model_class
    globals().update({cls.__name__: cls for cls in classes.values()})
    _REGISTERED[armor_type] = classes


def registered_class(model_type: str, auto: str = "AutoConfig") -> type:
    """The registered class of an ARMOR model type for an Auto class; :class:`ArmorError` when there is none."""
    register()
    try:
        return _REGISTERED[model_type][auto]
    except KeyError:
        raise ArmorError(f"no {auto} class for model type {model_type!r}") from None


register()

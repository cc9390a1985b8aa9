"""``armor-ref export-dense``: a compressed directory back to a plain checkpoint that loads everywhere.

Every factorized module ``NAME`` (spec §6 tensors ``NAME.armor.A/B/values/index``, or low-rank factors
``NAME.lowrank.U/V``) becomes an ordinary ``NAME.weight = Ŵ = blockdiag(A) · S · blockdiag(B)`` (or ``U V``), computed
in float64 and stored in the dense model's own
dtype (recorded by ``compress`` in ``quantization_config.dense``); every other tensor is copied as stored. The
output is sharded like the dense model: one ``model.safetensors`` when it was one file, else shards of at most its
largest shard's size, named and indexed as transformers names them. ``config.json`` gets the dense model type and
classes back and loses ``quantization_config`` and ``auto_map``; tokenizer and sentence-transformers files are
copied. The directory is built beside the target and renamed into place at the end, so a failed export leaves
nothing behind. No torch model is built: this needs torch only to read and write the tensors.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import Any

import numpy as np

from .armor_format import (
    ARMOR_SUFFIXES,
    LOWRANK_SUFFIXES,
    armor_layer,
    armor_stems,
    dense_tensor_name,
    is_factor_tensor,
    lowrank_layer,
    lowrank_stems,
)
from .errors import ArmorError
from .files import copy_file, read_safetensors_header, write_json, write_safetensors
from .manifest import verify_run
from .models import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    armor_quantization,
    companion_files,
    read_checkpoint_tensor,
    read_config,
    require_torch,
    tensor_locations,
    weight_files,
)


def dense_config(config: dict[str, Any]) -> dict[str, Any]:
    """An ARMOR directory's ``config.json`` as the dense model's: its model type and classes (as recorded in
    ``quantization_config.dense``), without ``quantization_config`` and ``auto_map``."""
    dense = armor_quantization(config)["dense"]
    plain = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    return {**plain, "model_type": dense["model_type"], "architectures": dense["architectures"]}


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> dict[str, list[str]]:
    """Shard file name -> tensor names: one ``model.safetensors`` without a limit, else tensors in natural order,
    a new shard whenever the next tensor would take the current one past ``max_shard_bytes`` (a tensor larger than
    the limit gets a shard of its own), named ``model-0000k-of-0000n.safetensors``."""
    names = sorted(sizes, key=natural_key)
    if max_shard_bytes is None:
        return {WEIGHTS_FILE: names}
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    n = len(groups)
    return {f"model-{k + 1:05d}-of-{n:05d}.safetensors": group for k, group in enumerate(groups)}


def export_dense(armor_dir: str, out_dir: str) -> dict[str, Any]:
    """Write the dense checkpoint of the ARMOR directory ``armor_dir`` to ``out_dir`` (which must not exist or be
    empty); return a summary (``files``, ``reconstructed``, ``copied``, ``dtype``)."""
    torch = require_torch()
    verify_run(armor_dir)  # a compress run: finished and unaltered (a save_pretrained directory has no manifest)
    config = read_config(armor_dir)
    dense = armor_quantization(config)["dense"]
    block_size = armor_quantization(config)["block_size"]
    if os.path.abspath(armor_dir) == os.path.abspath(out_dir):
        raise ArmorError("the output directory is the compressed directory", "choose another -o")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ArmorError(f"{out_dir!r} exists and is not an empty directory", "choose another -o, or remove it")
    dtype = getattr(torch, str(dense.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArmorError(f"{armor_dir}/config.json records an unknown dense dtype {dense.get('dtype')!r}")
    locations = tensor_locations(armor_dir)
    infos = {name: info for path in weight_files(armor_dir) for name, info in read_safetensors_header(path)[0].items()}
    stems = armor_stems(locations) + lowrank_stems(locations)
    copied = [name for name in locations if not is_factor_tensor(name)]
    sizes = {name: infos[name].end - infos[name].begin for name in copied}
    for stem in stems:
        d_out, d_in = _dense_shape(infos, stem)
        sizes[dense_tensor_name(stem)] = d_out * d_in * dtype.itemsize
    clash = sorted(set(copied) & {dense_tensor_name(s) for s in stems})
    if clash:
        raise ArmorError(f"{armor_dir} holds both {clash[0]} and its ARMOR factors", "write the directory again")
    shards = plan_shards(sizes, dense.get("max_shard_bytes"))

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    work = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.{uuid.uuid4().hex[:8]}.tmp")
    os.mkdir(work)  # the usual permissions (mkdtemp's are private)
    try:
        for name in companion_files(armor_dir):  # config.json (rewritten below), tokenizer, sentence-transformers
            os.makedirs(os.path.dirname(os.path.join(work, name)), exist_ok=True)
            copy_file(os.path.join(armor_dir, name), os.path.join(work, name))
        by_dense_name = {dense_tensor_name(s): s for s in stems}
        for file, names in shards.items():
            tensors = {}
            for name in names:
                if name in by_dense_name:
                    layer = _read_layer(locations, by_dense_name[name], block_size, armor_dir)
                    tensors[name] = torch.from_numpy(layer.reconstruct(np.float64)).to(dtype)
                else:
                    tensors[name] = read_checkpoint_tensor(locations, name)
            write_safetensors(os.path.join(work, file), tensors, {"format": "pt"})
        if len(shards) > 1:
            weight_map = {name: file for file, names in shards.items() for name in names}
            write_json(
                os.path.join(work, WEIGHTS_INDEX),
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))},
            )
        write_json(os.path.join(work, "config.json"), dense_config(config))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "files": sorted(shards),
        "reconstructed": len(stems),
        "copied": len(copied),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _dense_shape(infos: dict[str, Any], stem: str) -> tuple[int, int]:
    """``(d_out, d_in)`` of stored layer ``stem``, from the shard headers."""
    if f"{stem}.lowrank.U" in infos:
        return infos[f"{stem}.lowrank.U"].shape[0], infos[f"{stem}.lowrank.V"].shape[1]
    d_out, half = infos[f"{stem}.armor.values"].shape
    return d_out, 2 * half


def _read_layer(locations: dict[str, str], stem: str, block_size: int, source: str) -> Any:
    """The validated stored layer ``stem``: ARMOR (:func:`toolkit.armor_format.armor_layer`) or low-rank
    (:func:`toolkit.armor_format.lowrank_layer`)."""
    lowrank = f"{stem}.lowrank.U" in locations
    keys = [stem + suffix for suffix in (LOWRANK_SUFFIXES if lowrank else ARMOR_SUFFIXES) if stem + suffix in locations]
    arrays = {key: read_checkpoint_tensor(locations, key).numpy() for key in keys}
    return lowrank_layer(stem, arrays, source) if lowrank else armor_layer(stem, arrays, block_size, source)

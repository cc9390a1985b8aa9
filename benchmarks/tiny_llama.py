"""Benchmark: the causal path end to end on a small Llama trained here on local text, every method.

A random model's perplexity says nothing about compression, so this benchmark first trains a small Llama-layout
model for a few minutes on the CPU, entirely offline:

* text: Python's ``pydoc_data.topics``, split by topic: every 10th topic (sorted by name) is held out for
  evaluation, the rest is for training and calibration;
* tokenizer: a byte-level BPE (4096 tokens) trained with ``tokenizers`` on the training topics;
* model: ``LlamaConfig`` with 4 blocks, hidden 256, MLP 704, 4 heads, untied LM head (5.3 M parameters);
* training: next-token prediction on the training topics (windows of 128 tokens, batch 16, AdamW, cosine
  schedule, ``--steps`` steps, seed 0).

Then every method compresses it with ``armor-ref``'s pipeline (calibration: 64 windows × 128 tokens of the
training topics, block size 32), and each compressed directory is evaluated with sliding-window perplexity on the
held-out topics, next to the dense model's. (A model this small does not transfer to other text: on stdlib
docstrings its perplexity is in the hundreds, and compression differences there are noise.)

Writes ``benchmarks/results/tiny_llama.json`` (per-layer figures, machine info) and prints the README table::

    python benchmarks/tiny_llama.py [--steps 600] [--runs magnitude,wanda,nowag-p,sparsegpt,armor-nowag,armor-hessian]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from minilm_model import LABELS, shards_size  # noqa: E402

from toolkit.compress import CompressSettings, compress_model  # noqa: E402
from toolkit.evaluate import evaluate_model  # noqa: E402
from toolkit.report import machine_info  # noqa: E402

RESULTS = os.path.join(HERE, "results", "tiny_llama.json")
EVAL = {"max_length": 128, "stride": 64, "max_tokens": 20000}


def train_tokenizer(text: str, out_dir: str, vocab: int) -> object:
    """A byte-level BPE tokenizer trained on ``text``, saved to ``out_dir`` as a transformers fast tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def train_model(text: str, out_dir: str, steps: int, seed: int = 0) -> dict:
    """Train the small Llama on ``text`` and save it (safetensors + tokenizer) to ``out_dir``."""
    import torch
    import transformers

    tokenizer = train_tokenizer(text, out_dir, 4096)
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 129, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 128] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss:.3f}", flush=True)
    model.eval()
    model.save_pretrained(out_dir)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": len(ids),
        "steps": steps,
        "final_train_loss_mean_of_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": time.perf_counter() - t0,
    }


def split_topics() -> tuple[str, str]:
    """``pydoc_data.topics`` split by topic (sorted by name): every 10th held out. Returns (training, held-out)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = "\n\n".join(topics[k] for i, k in enumerate(names) if i % 10)
    heldout = "\n\n".join(topics[k] for i, k in enumerate(names) if i % 10 == 0)
    return train, heldout


def prepare(work_dir: str, steps: int) -> tuple[str, str, str, dict]:
    """The texts and the trained model in ``work_dir``: ``(dense_dir, calibration_text, heldout_text, training)``.
    A model already trained there (``training.json`` beside it) is reused, not trained again."""
    os.makedirs(work_dir, exist_ok=True)
    text, heldout = split_topics()
    calib = os.path.join(work_dir, "train_topics.txt")
    evaltext = os.path.join(work_dir, "heldout_topics.txt")
    with open(calib, "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(evaltext, "w", encoding="utf-8") as fh:
        fh.write(heldout)
    dense = os.path.join(work_dir, "dense")
    record = os.path.join(work_dir, "training.json")
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as fh:
            training = json.load(fh)
        if training["steps"] == steps:
            return dense, calib, evaltext, training
    training = train_model(text, dense, steps)
    print(f"trained {training['parameters'] / 1e6:.1f} M parameters in {training['seconds']:.0f} s", flush=True)
    with open(record, "w", encoding="utf-8") as fh:
        json.dump(training, fh)
    return dense, calib, evaltext, training


def markdown_table(results: dict) -> str:
    rows = [
        "| method | perplexity | × dense | mean rel. output error (calib) | compression time (s) | file size (MB) |",
        "|---|---|---|---|---|---|",
    ]
    dense = results["dense_perplexity"]
    for r in sorted(results["runs"].values(), key=lambda r: r["perplexity"]):
        rows.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r['perplexity']:.2f} | {r['perplexity'] / dense:.3f} | "
            f"{r['mean_relative_output_error']:.4f} | {r['compression_seconds']:.0f} | {r['file_bytes'] / 1e6:.1f} |"
        )
    rows.append(f"| dense (reference) | {dense:.2f} | 1 | 0 | - | {results['dense_file_bytes'] / 1e6:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--runs", default="magnitude,wanda,nowag-p,sparsegpt,armor-nowag,armor-hessian")
    parser.add_argument("--work-dir", default="/tmp/armor-tiny-llama")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shutil.rmtree(args.work_dir, ignore_errors=True)
    dense, calib, evaltext, training = prepare(args.work_dir, args.steps)
    results: dict = {
        "setup": {
            "model": "Llama layout, 4 blocks, hidden 256, MLP 704, 4 heads, BPE vocabulary 4096, untied head",
            "training": f"pydoc_data.topics minus every 10th topic, {args.steps} steps of 16 x 128 tokens, "
            "AdamW lr 2e-3, cosine",
            "calibration": "the training topics, 64 windows x 128 tokens",
            "evaluation": f"every 10th topic of pydoc_data.topics (held out), sliding-window perplexity {EVAL}",
            "block_size": 32,
        },
        "training": training,
        "machine": machine_info(),
        "runs": {},
    }
    results["dense_perplexity"] = evaluate_model(dense, evaltext, **EVAL)["perplexity"]
    results["dense_file_bytes"] = shards_size(dense)
    for method in args.runs.split(","):
        out = os.path.join(args.work_dir, method)
        report = compress_model(dense, out, calib, CompressSettings(method=method), progress=False)
        ev = evaluate_model(out, evaltext, **EVAL)
        errors = [layer["relative_output_error"] for layer in report["layers"]]
        results["runs"][method] = {
            "method": method,
            "perplexity": ev["perplexity"],
            "tokens": ev["tokens"],
            "compression_seconds": report["seconds_blocks"],
            "file_bytes": shards_size(out),
            "mean_relative_output_error": sum(errors) / len(errors),
            "layers": [{k: v for k, v in layer.items() if k != "block"} for layer in report["layers"]],
        }
        print(f"{method}: perplexity {ev['perplexity']:.2f} (dense {results['dense_perplexity']:.2f})", flush=True)
        tmp = RESULTS + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, RESULTS)
    print(markdown_table(results))


if __name__ == "__main__":
    main()

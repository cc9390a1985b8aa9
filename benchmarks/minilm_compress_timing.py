"""Whole all-MiniLM-L6-v2 ``compress --method armor-hessian`` at default settings: this checkout against the old path
(commit 35fb0ed, before the fast path), side by side, alternating (issue 10's CPU target: ≤ 4 min on an idle
2-core machine, against 8 min 45 s for the old path).

Each run is a fresh process at the command's default settings (threads included: the old path's BLAS default, this
checkout's ``--threads`` default), timed like ``/usr/bin/time``: wall seconds, user and system CPU seconds and peak
resident memory of the child (``os.wait4``). Before every run the script waits until the 1-minute load average is
below ``--quiet-load`` (at most ``--settle`` seconds; the previous run's own load would otherwise show as a busy
core, and the default thread count reads it) and records the load average. Every output is then evaluated with its
own path's ``eval --reference --json`` on the README's held-out text (256 standard-library docstring passages):
embedding cosine to the dense model and retrieval accuracy. Order: old, new, old, new, … (``--repeats`` pairs).

The old path is extracted with ``git archive 35fb0ed`` into the work directory (or given with ``--old-dir``); its
CLI is ``python -m armor_ref.cli`` run from that directory. Run from the repository root on an idle machine
(about 30 minutes for 2 pairs)::

    python benchmarks/minilm_compress_timing.py --repeats 2
    python benchmarks/minilm_compress_timing.py --repeats 1 --options "--sweeps 1 --nsamples 4" --quiet-load 99 \\
        --out /tmp/timing_smoke.json                      # a smoke test (a few minutes)

Writes ``benchmarks/results/minilm_compress_timing.json`` (the earlier single runs are kept under ``earlier``) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from make_demo_data import model_dir  # noqa: E402
from minilm_model import write_calibration_text, write_evaluation_text  # noqa: E402

from toolkit.report import machine_info  # noqa: E402

RESULTS = HERE / "results" / "minilm_compress_timing.json"
OLD_COMMIT = "35fb0ed"


def old_checkout(work: Path, commit: str) -> Path:
    """The old path's files, extracted once with ``git archive``."""
    target = work / f"old-{commit}"
    if not (target / "armor_ref" / "cli.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def commands(path: str, old_dir: Path) -> tuple[list[str], dict[str, str], Path]:
    """The CLI prefix, environment and working directory of a path (``old`` or ``new``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    if path == "old":  # run from its own directory, so that its armor_ref shadows any installed one
        env["PYTHONPATH"] = str(old_dir)
        return [sys.executable, "-m", "armor_ref.cli"], env, old_dir
    env["PYTHONPATH"] = str(ROOT)
    return [sys.executable, "-m", "toolkit"], env, ROOT


def wait_for_quiet(limit: float, settle: float) -> list[float]:
    """Wait until the 1-minute load average is below ``limit`` (at most ``settle`` seconds); return the load."""
    deadline = time.monotonic() + settle
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        time.sleep(5)
    return list(os.getloadavg())


def timed(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict:
    """Run ``argv`` and return wall, user, system seconds and peak RSS (MiB) of the child, like /usr/bin/time."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        child = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {code}; see {log}")
    return {
        "wall_seconds": wall,
        "user_cpu_seconds": usage.ru_utime,
        "system_cpu_seconds": usage.ru_stime,
        "max_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
    }


def evaluate(path: str, old_dir: Path, out_dir: Path, evaltext: Path, log: Path) -> dict:
    prefix, env, cwd = commands(path, old_dir)
    argv = [*prefix, "eval", str(out_dir), "--text", str(evaltext), "--reference", model_dir(), "--json"]
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise SystemExit(f"eval of {out_dir} failed; see {log}")
    report = json.loads(result.stdout[result.stdout.index("{") :])
    return {"cosine_to_dense": report["cosine_to_reference"], "retrieval_accuracy": report["retrieval_accuracy"]}


def git_head() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def table(report: dict) -> str:
    lines = [
        "| path | run | load before | threads | wall | user CPU | peak RSS | cosine to dense | retrieval |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['path']} | {r['repeat']} | {r['load_before'][0]:.2f} | {r['threads']} "
            f"| {minutes(r['wall_seconds'])} "
            f"| {r['user_cpu_seconds']:.0f} s | {r['max_rss_mib']:.0f} MiB | {r['cosine_to_dense']:.4f} "
            f"| {r['retrieval_accuracy']:.3f} |"
        )
    for path in ("old", "new"):
        walls = sorted(r["wall_seconds"] for r in report["runs"] if r["path"] == path)
        if walls:
            lines.append(f"\n{path}: median wall {minutes(walls[len(walls) // 2])} over {len(walls)} runs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (old, new)")
    parser.add_argument("--paths", default="old,new", help="which paths to run, in this order within each pair")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--old-dir", type=Path, default=None, help="an existing checkout of the old path")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/armor-compress-timing"))
    parser.add_argument("--quiet-load", type=float, default=0.5, help="wait for a 1-minute load average below this")
    parser.add_argument("--settle", type=float, default=300.0, help="longest wait for it, seconds")
    parser.add_argument("--options", default="", help="extra compress options for both paths (smoke: '--sweeps 1')")
    parser.add_argument("--new-options", default="", help="extra compress options for this checkout ('--threads 1')")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    old_dir = args.old_dir or old_checkout(work, args.old_commit)
    calib, evaltext = work / "calib_pydoc_topics.txt", work / "eval_stdlib_docstrings.txt"
    if not calib.is_file():
        write_calibration_text(str(calib))
    if not evaltext.is_file():
        write_evaluation_text(str(evaltext))
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report = {
        "what": "whole all-MiniLM-L6-v2 (36 linears), compress --method armor-hessian at default settings, "
        "old path and this checkout side by side, alternating",
        "calibration": "pydoc_data.topics, 64 x 128 tokens (both paths' defaults)",
        "evaluation": "256 stdlib-docstring passages (eval --reference, each path's own)",
        "old": {
            "commit": args.old_commit,
            "command": "python -m armor_ref.cli compress MODEL -o OUT --calib-text CALIB --method armor-hessian "
            f"--quiet {args.options}".strip()
            + " (BLAS default threads)",
        },
        "new": {
            "commit": git_head(),
            "command": "python -m toolkit compress MODEL -o OUT --calib-text CALIB "
            f"--method armor-hessian --quiet {args.options} {args.new_options}".strip()
            + " (--threads default: free cores)",
        },
        "machine": machine_info(),
        "runs": [],
        "earlier": earlier.get("earlier", earlier.get("runs", [])) if earlier else [],
    }
    for repeat in range(args.repeats):
        for path in args.paths.split(","):
            out_dir = work / f"{path}-{repeat}"
            subprocess.run(["rm", "-rf", str(out_dir)], check=True)
            prefix, env, cwd = commands(path, old_dir)
            argv = [*prefix, "compress", model_dir(), "-o", str(out_dir), "--calib-text", str(calib)]
            argv += ["--method", "armor-hessian", "--quiet"]
            argv += args.options.split() + (args.new_options.split() if path == "new" else [])
            load = wait_for_quiet(args.quiet_load, args.settle)
            threads = "BLAS default" if path == "old" else _default_threads_now()
            print(f"{path} run {repeat}: load {load[0]:.2f}, threads {threads} ...", flush=True)
            run = {"path": path, "repeat": repeat, "load_before": load, "threads": threads}
            run.update(timed(argv, env, cwd, work / f"{path}-{repeat}.log"))
            run["load_after"] = list(os.getloadavg())
            run.update(evaluate(path, old_dir, out_dir, evaltext, work / f"{path}-{repeat}-eval.log"))
            report["runs"].append(run)
            print(
                f"  wall {minutes(run['wall_seconds'])}, user {run['user_cpu_seconds']:.0f} s, "
                f"peak {run['max_rss_mib']:.0f} MiB, cosine {run['cosine_to_dense']:.4f}",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


def _default_threads_now() -> int | str:
    """What the new path's ``--threads`` default reads at this moment (the child reads it again when it starts)."""
    from backends.threads import default_threads

    return default_threads()


if __name__ == "__main__":
    main()

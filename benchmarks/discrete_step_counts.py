"""Torch ops and kernel launches of one sweep of the fast path (torch backend), the discrete step walked by the loop
(:func:`backends.factorization.walk_column_block`, position after position) or by the fused Triton kernel
(:func:`backends.torch.discrete_kernel.walk_column_block_fused`, one launch per batch of column blocks) — issue 10,
item 1: the launches per sweep must grow with ``d_in/32``, not with ``(d_in/32)·256``.

Counting, as the issue did: a ``TorchDispatchMode`` counts every aten op dispatched during sweep 1 of
``backends.factorization.factorize`` (SparseGPT start, block 32, float64), in total and inside the discrete step.
Each op of the loop path is a kernel launch on a GPU; on the fused path each walk is its own host ops (counted)
plus ONE launch. Without a GPU the fused path runs the real ``walk_column_block_fused`` with its launch stood in
for by the loop, with counting paused (the same decisions: tests/fused_walk_cases.py checks them under Triton's
interpreter), and counted as the one launch it is; ``--real-kernel`` launches the kernel itself (``--device cuda``;
on the CPU only with ``TRITON_INTERPRET=1``, slow). The two paths' sweep-1 masks and losses are checked to agree.

    PYTHONPATH=$PWD python benchmarks/discrete_step_counts.py [--shapes 256x256,1024x1024,512x2048]

Writes ``benchmarks/results/discrete_step_counts.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from armor_ref.factorization import DEFAULT_BLOCK_SIZE
from backends import factorization as fast
from backends.torch import discrete_kernel as dk
from toolkit.files import write_json
from toolkit.report import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "discrete_step_counts.json"
SHAPES = [(256, 256), (1024, 1024), (512, 2048)]


class OpCounter(TorchDispatchMode):
    """Counts aten ops, except while :meth:`paused`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops += self.counting
        return func(*args, **(kwargs or {}))

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.counting = False
        try:
            yield
        finally:
            self.counting = True


class StandInLaunch:
    """Takes the place of ``dk._walk_kernel``: records the launch, does nothing (the walk's work is done by the loop
    right after, uncounted)."""

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextmanager
def patched(obj: Any, **attributes: Any) -> Iterator[None]:
    saved = {name: getattr(obj, name) for name in attributes}
    for name, value in attributes.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def count_sweep(W: np.ndarray, gram: np.ndarray, proxy: str, path: str, device: str) -> dict:
    """Ops of sweep 1 (total and in the discrete step), positions visited, walks and launches, and the result.
    ``path``: ``loop``, ``fused`` (stand-in launch on the CPU) or ``kernel`` (the real launch)."""
    counter = OpCounter()
    tally = {"discrete_ops": 0, "positions": 0, "walks": 0, "launches": 0}

    def walk(*args: Any) -> Any:
        tally["walks"] += 1
        tally["positions"] += len(args[-1])
        if path == "loop":
            return fast.walk_column_block(*args)
        launches = dk.LAUNCHES["walk_column_block"]
        if path == "kernel":  # under the interpreter its copies are not the path's ops (nor, then, the wrapper's)
            with counter.paused() if dk.interpreting() else nullcontext():
                changed = dk.walk_column_block_fused(*args)
        else:  # the real wrapper (its host ops counted) around a stand-in launch, then the loop's work uncounted
            with patched(dk, _walk_kernel=StandInLaunch(), interpreting=lambda: True):
                dk.walk_column_block_fused(*args)
            with counter.paused():
                changed = fast.walk_column_block(*args)
        tally["launches"] += dk.LAUNCHES["walk_column_block"] - launches
        return changed

    real_step = fast.discrete_step

    def discrete_step(*args: Any) -> int:
        before = counter.ops
        changed = real_step(*args)
        tally["discrete_ops"] += counter.ops - before
        return changed

    with patched(fast, discrete_step=discrete_step, column_block_walk=lambda xp: walk):
        t0 = time.perf_counter()
        with counter:
            result = fast.factorize(W, gram, proxy=proxy, sweeps=1, tol=0.0, library="torch", device=device,
                                    dtype="float64", threads=1)  # fmt: skip
        seconds = time.perf_counter() - t0
    return {"ops_per_sweep": counter.ops, **tally, "seconds": seconds, "loss": result.loss, "M": result.M}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--proxies", default="hessian,nowag")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real-kernel", action="store_true", help="launch the Triton kernel (GPU or interpreter)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    fused = "kernel" if args.real_kernel else "fused"
    report = {
        "machine": machine_info(),
        "device": args.device,
        "block_size": DEFAULT_BLOCK_SIZE,
        "fused_launch": "the Triton kernel" if args.real_kernel else "stand-in: the loop, uncounted, as one launch",
        "load_average_before": list(os.getloadavg()),
        "rows": [],
    }
    for spec in args.shapes.split(","):
        d_out, d_in = (int(v) for v in spec.lower().split("x"))
        rng = np.random.default_rng(0)
        W = rng.standard_normal((d_out, d_in))
        X = rng.standard_normal((2 * d_in, d_in)) * rng.uniform(0.2, 3.0, d_in)
        gram = X.T @ X
        for proxy in args.proxies.split(","):
            loop = count_sweep(W, gram, proxy, "loop", args.device)
            kernel = count_sweep(W, gram, proxy, fused, args.device)
            assert np.array_equal(loop.pop("M"), kernel.pop("M")), "the fused path chose other masks"
            assert abs(loop["loss"] - kernel["loss"]) <= 1e-9 * loop["loss"], (loop["loss"], kernel["loss"])
            row = {"shape": [d_out, d_in], "proxy": proxy, "column_blocks": d_in // DEFAULT_BLOCK_SIZE,
                   "loop": loop, "fused": kernel}  # fmt: skip
            report["rows"].append(row)
            print(
                f"{d_out}x{d_in} {proxy}: loop {loop['ops_per_sweep']} ops/sweep ({loop['discrete_ops']} in the "
                f"discrete step, {loop['positions']} positions); fused {kernel['ops_per_sweep']} ops/sweep "
                f"({kernel['discrete_ops']} in the discrete step, {kernel['launches']} launches, "
                f"{row['column_blocks']} column blocks)",
                flush=True,
            )
    report["load_average_after"] = list(os.getloadavg())
    write_json(Path(args.out), report)
    print("| shape | proxy | column blocks | loop ops/sweep | fused ops/sweep | positions | launches |")
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['proxy']} | {r['column_blocks']} | {r['loop']['ops_per_sweep']:,} "
            f"| {r['fused']['ops_per_sweep']:,} | {r['loop']['positions']:,} | {r['fused']['launches']} |"
        )


if __name__ == "__main__":
    main()

"""The fused discrete walk (backends/torch/discrete_kernel.py): where the discrete step takes it, and its checks.

The checks of its answers are ``fused_walk_cases.py``, run here in a fresh interpreter: on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported and must not reach any other test;
``ARMOR_FUSED_WALK=1`` forces the kernel on the CPU), and on CUDA where a GPU is visible (the kernel compiled, chosen
by the device as in production). Without a GPU the kernel is also compiled for an H100 (sm_90), which type-checks
the compiled path and lets ptxas say whether the tile fits in registers.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends import factorization as fast
from backends.xp import make_namespace

CASES = Path(__file__).with_name("fused_walk_cases.py")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the 'gpu' or 'test' extra)")


def run_cases(env: dict[str, str]) -> str:
    """Run fused_walk_cases.py in a fresh interpreter with ``env``; fail with its output unless every case passed."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", output) and not re.search(r"\b(skipped|failed|error)", output), output
    return output


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ARMOR_FUSED_WALK")}
    return {**env, **extra}


@needs_triton
def test_fused_walk_under_the_interpreter():
    run_cases(clean_env(TRITON_INTERPRET="1", ARMOR_FUSED_WALK="1", ARMOR_TEST_DEVICE="cpu"))


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA GPU")
def test_fused_walk_on_cuda():
    run_cases(clean_env(ARMOR_TEST_DEVICE="cuda"))


def test_the_discrete_step_takes_the_kernel_only_where_asked(monkeypatch):
    """Auto: the loop on NumPy and torch's CPU (no triton import needed); ``ARMOR_FUSED_WALK=0`` keeps the loop
    everywhere, ``=1`` takes the kernel on torch namespaces, any other value is an error."""
    numpy_xp, torch_xp = make_namespace("numpy", None), make_namespace("torch", "cpu")
    monkeypatch.delenv(fast.FUSED_WALK_ENV, raising=False)
    assert fast.column_block_walk(numpy_xp) is fast.walk_column_block
    assert fast.column_block_walk(torch_xp) is fast.walk_column_block
    monkeypatch.setenv(fast.FUSED_WALK_ENV, "0")
    assert fast.column_block_walk(torch_xp) is fast.walk_column_block
    monkeypatch.setenv(fast.FUSED_WALK_ENV, "yes")
    with pytest.raises(ValueError, match="ARMOR_FUSED_WALK"):
        fast.column_block_walk(torch_xp)
    if HAS_TRITON:
        from backends.torch import discrete_kernel as dk

        monkeypatch.setenv(fast.FUSED_WALK_ENV, "1")
        assert fast.column_block_walk(torch_xp) is dk.walk_column_block_fused
        assert fast.column_block_walk(numpy_xp) is fast.walk_column_block  # the kernel is torch's


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs triton and no GPU")
def test_fused_walk_refuses_cpu_tensors_when_triton_compiles():
    from backends.torch import discrete_kernel as dk

    if dk.interpreting():
        pytest.skip("TRITON_INTERPRET=1 reached this process")
    S = torch.zeros(1, 8, 1, 2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dk.walk_column_block_fused(None, S, S > 0, S.reshape(1, 8, 8), None, None, None, 1e-12, [0])


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs triton; on a GPU the kernel runs")
@pytest.mark.parametrize(("dtype", "b"), [("fp32", 32), ("fp64", 32), ("fp64", 64)])
def test_fused_walk_compiles_for_h100_without_spilling(dtype, b, tmp_path):
    """Triton's compiled path (not the interpreter's) type-checks the kernel, and ptxas keeps it in registers for
    sm_90 at the default warps — checked without a GPU (with one, test_fused_walk_on_cuda runs the kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from backends.torch import discrete_kernel as dk

    if dk.interpreting():
        pytest.skip("TRITON_INTERPRET=1 reached this process")
    pointers = {"M_ptr": "*u8", "sup_ptr": "*i64", "pos_ptr": "*i64", "changed_ptr": "*i32"}
    signature = {}
    for name in inspect.signature(dk._walk_kernel.fn).parameters:
        if name in ("B", "NB"):
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, f"*{dtype}")
        else:
            signature[name] = "i32"
    source = ASTSource(dk._walk_kernel, signature, constexprs={"B": b, "NB": b // 4})
    options = {"num_warps": dk.default_num_warps(b), "enable_fp_fusion": False}  # as walk_column_block_fused
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = tmp_path / f"walk_{dtype}_{b}.ptx"
    ptx.write_text(kernel.asm["ptx"])
    done = subprocess.run(
        [get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull], capture_output=True, text=True
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "0 bytes spill stores" in report and "0 bytes spill loads" in report, report

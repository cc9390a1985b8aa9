"""The ``armor-ref`` command line, through click's CliRunner: every command, the report, and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST, SmallModel, make_small_model, write_raw_safetensors
from safetensors.numpy import load_file, save_file

from armor_ref.factorization import factorize
from armor_ref.masks import is_2of4
from armor_ref.objectives import gram_matrix
from toolkit.armor_format import load_armor
from toolkit.cli import cli
from toolkit.errors import EXIT_INPUT
from toolkit.files import read_safetensors


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of ``directory`` with the hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def factorized(small_model: SmallModel) -> tuple[SmallModel, Path]:
    """The small model factorized by the CLI with default names."""
    result = run("factorize", small_model.weights, "--calib", small_model.calib, *FAST)
    assert result.exit_code == 0, result.output
    return small_model, small_model.dir / "model.armor.safetensors"


# ----------------------------------------------------------------------------------------------------------
# factorize
# ----------------------------------------------------------------------------------------------------------
def test_factorize_writes_a_file_that_rebuilds_the_in_memory_result(factorized):
    model, out = factorized
    armor = load_armor(out)
    assert armor.names == ["l1.weight", "l2.weight"]
    assert sorted(armor.passthrough) == ["l1.bias", "norm.weight"]
    assert armor.metadata["proxy"] == "nowag" and armor.block_size == 16
    assert armor.metadata["init"] == "nowag-p" and armor.metadata["source"] == "model.safetensors"
    H = gram_matrix(model.X)
    for name in armor.names:
        W = model.tensors[name].astype(np.float64)
        expected = factorize(W, H, proxy="nowag", block_size=16, sweeps=2, seed=0).W_hat()
        rebuilt = armor.reconstruct(name)
        np.testing.assert_allclose(rebuilt, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        assert is_2of4(armor.layers[name].core()[0])
    np.testing.assert_array_equal(armor.passthrough["l1.bias"], model.tensors["l1.bias"])


def test_factorize_prints_a_table_and_writes_the_json_report(small_model):
    result = run("factorize", small_model.weights, "--calib", small_model.calib, *FAST, "--tensors", "l1.*")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for word in (
        "l1.weight",
        "64x128",
        "magnitude",
        "wanda",
        "nowag-p",
        "sparsegpt",
        "ARMOR (nowag)",
        "ARMOR loss / nowag-p loss",
        "calib out err",
    ):
        assert word in out
    assert "l2.weight" not in out
    assert "note: 1 tensor(s) that are not 2-D" in result.stderr  # l1.bias matches l1.* and is skipped

    report = json.loads((small_model.dir / "model.armor.report.json").read_text())
    assert report["settings"]["proxy"] == "nowag" and report["settings"]["block_size"] == 16
    entry = report["tensors"]["l1.weight"]
    assert list(report["tensors"]) == ["l1.weight"]
    assert entry["shape"] == [64, 128] and entry["calibration_tokens"] == 200
    assert set(entry["baselines"]) == {"magnitude", "wanda", "nowag-p", "sparsegpt"}
    armor = entry["armor"]
    # ARMOR starts at NoWag-P and never increases the loss; NoWag-P is the best 2:4 method for nowag
    assert armor["start_loss"] == pytest.approx(entry["baselines"]["nowag-p"]["proxy_loss"], rel=1e-9)
    assert armor["proxy_loss"] <= armor["start_loss"] and armor["loss_ratio_to_init"] < 1
    assert all(b["proxy_loss"] >= armor["start_loss"] * (1 - 1e-9) for b in entry["baselines"].values())
    losses = [step["loss"] for step in armor["trace"]]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:], strict=False))
    ratio = armor["calib_output_error"] / entry["baselines"]["sparsegpt"]["calib_output_error"]
    assert armor["calib_error_ratio_to_sparsegpt"] == pytest.approx(ratio)
    assert armor["sweeps"] == 2 and armor["seconds"] > 0


def test_factorize_hessian_with_explicit_output_and_report(small_model, tmp_path):
    out, report, held = tmp_path / "custom.safetensors", tmp_path / "r.json", tmp_path / "held.npy"
    np.save(held, np.random.default_rng(9).standard_normal((40, 128)))
    result = run(
        "factorize",
        "--heldout",
        held,
        small_model.weights,
        "--calib",
        small_model.calib,
        *FAST,
        "--proxy",
        "hessian",
        "--tensors",
        "l1.weight",
        "-o",
        out,
        "--report",
        report,
    )
    assert result.exit_code == 0, result.output
    assert "ARMOR (hessian)" in result.stdout
    assert "held-out err" in result.stdout and "held-out error / SparseGPT's" in result.stdout
    data = json.loads(report.read_text())
    assert data["heldout"] == str(held)
    entry = data["tensors"]["l1.weight"]
    assert entry["init"] == "sparsegpt"
    assert all("heldout_output_error" in b for b in entry["baselines"].values())
    ratio = entry["armor"]["heldout_output_error"] / entry["baselines"]["sparsegpt"]["heldout_output_error"]
    assert entry["armor"]["heldout_error_ratio_to_sparsegpt"] == pytest.approx(ratio)
    assert entry["armor"]["calib_error_ratio_to_sparsegpt"] < 1  # hessian ARMOR beats its SparseGPT start
    armor = load_armor(out)
    assert armor.proxy == "hessian" and armor.names == ["l1.weight"]
    assert "l2.weight" in armor.passthrough  # not selected: copied through unchanged


@pytest.mark.parametrize("proxy", ["nowag", "hessian"])
def test_dead_input_channels_and_fewer_rows_than_inputs_are_legal(tmp_path, proxy):
    model = make_small_model(tmp_path)
    X = model.X[:20].copy()  # 20 tokens < d_in = 128
    X[:, [0, 5, 77]] = 0.0  # dead channels, h_j = 0
    np.save(model.calib, X)
    result = run("factorize", model.weights, "--calib", model.calib, *FAST, "--proxy", proxy)
    assert result.exit_code == 0, result.output
    armor = load_armor(tmp_path / "model.armor.safetensors")
    for name in armor.names:
        assert np.all(np.isfinite(armor.reconstruct(name)))


def test_factorize_with_npz_gram_calibration(small_model):
    """A selected tensor without calibration is an error naming it (nothing written); leaving it out with
    --tensors factorizes the rest."""
    npz = small_model.dir / "calib.npz"
    np.savez(npz, **{"l2.weight.gram": gram_matrix(small_model.X)})
    before = snapshot(small_model.dir)
    result = run("factorize", small_model.weights, "--calib", npz, *FAST)
    assert_clean_failure(result, "no calibration for 1 of the 2 selected tensor(s): l1.weight 64x128")
    assert "--tensors" in result.stderr and snapshot(small_model.dir) == before
    result = run("factorize", small_model.weights, "--calib", npz, *FAST, "--tensors", "l2.*")
    assert result.exit_code == 0, result.output
    assert "calibration=Gram matrix" in result.stdout
    assert load_armor(small_model.dir / "model.armor.safetensors").names == ["l2.weight"]


def test_repeated_calib_files_are_merged_and_an_overlap_is_refused(small_model):
    """Two files calibrating different tensors give the result of one file calibrating both; two files
    calibrating the same tensor are refused with a one-line error naming both."""
    d = small_model.dir
    np.savez(d / "l1.npz", **{"l1.weight": small_model.X})
    np.savez(d / "l2.npz", **{"l2.weight.gram": gram_matrix(small_model.X)})
    np.savez(d / "both.npz", **{"l1.weight": small_model.X, "l2.weight.gram": gram_matrix(small_model.X)})
    merged, single = d / "merged.safetensors", d / "single.safetensors"
    two = ["--calib", d / "l1.npz", "--calib", d / "l2.npz"]
    assert run("factorize", small_model.weights, *two, *FAST, "-o", merged).exit_code == 0
    assert run("factorize", small_model.weights, "--calib", d / "both.npz", *FAST, "-o", single).exit_code == 0
    a, b = load_armor(merged), load_armor(single)
    assert a.names == b.names == ["l1.weight", "l2.weight"]
    for name in a.names:
        np.testing.assert_array_equal(a.reconstruct(name), b.reconstruct(name))
    report = json.loads((d / "merged.report.json").read_text())
    assert report["calibration"] == [str(d / "l1.npz"), str(d / "l2.npz")]
    before = snapshot(d)
    result = run("factorize", small_model.weights, "--calib", d / "l1.npz", "--calib", d / "both.npz", *FAST)
    assert_clean_failure(result, "tensor 'l1.weight' gets calibration from both")
    assert snapshot(d) == before


def test_factorize_reads_bfloat16_and_float16_weights(small_model):
    W = small_model.tensors["l1.weight"]
    bf16_bits = (W.view(np.uint32) >> 16).astype("<u2")  # truncated to bfloat16
    bias16 = small_model.tensors["l1.bias"].astype("<f2")
    write_raw_safetensors(
        small_model.weights,
        {"l1.weight": ("BF16", [64, 128], bf16_bits.tobytes()), "l1.bias": ("F16", [64], bias16.tobytes())},
    )
    result = run("factorize", small_model.weights, "--calib", small_model.calib, *FAST)
    assert result.exit_code == 0, result.output
    armor = load_armor(small_model.dir / "model.armor.safetensors")
    W_bf16 = (bf16_bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    expected = factorize(W_bf16, gram_matrix(small_model.X), block_size=16, sweeps=2).W_hat()
    np.testing.assert_allclose(armor.reconstruct("l1.weight"), expected, atol=1e-5 * np.abs(expected).max())
    assert armor.passthrough["l1.bias"].dtype == np.float16


# ----------------------------------------------------------------------------------------------------------
# prune, inspect, reconstruct, demo
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_writes_dense_2of4_tensors(small_model, method):
    result = run("prune", small_model.weights, "--calib", small_model.calib, "--method", method)
    assert result.exit_code == 0, result.output
    assert "l1.weight" in result.stdout and "nowag loss" in result.stdout
    pruned = load_file(str(small_model.dir / f"model.{method}-2of4.safetensors"))
    for name in ("l1.weight", "l2.weight"):
        assert pruned[name].dtype == np.float32 and pruned[name].shape == small_model.tensors[name].shape
        assert is_2of4(pruned[name]) and np.count_nonzero(pruned[name]) == pruned[name].size // 2
    if method == "magnitude":  # kept entries keep their value
        W = small_model.tensors["l1.weight"]
        kept = pruned["l1.weight"] != 0
        np.testing.assert_array_equal(pruned["l1.weight"][kept], W[kept])
    np.testing.assert_array_equal(pruned["norm.weight"], small_model.tensors["norm.weight"])


def test_inspect_armor_and_plain_files(factorized):
    model, out = factorized
    result = run("inspect", out)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "ARMOR file" in text and "block size 16" in text and "proxy nowag" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    l1 = lines["l1.weight"]
    assert l1[1:3] == ["64x128", "ok"]
    # stored: A 4·16·16·4 + B 8·16·16·4 + values 64·64·4 + index 64·32 bytes; dense fp16 64·128·2, fp32 ×2
    assert int(l1[3]) == 4 * 256 * 4 + 8 * 256 * 4 + 64 * 64 * 4 + 64 * 32
    assert int(l1[5]) == 64 * 128 * 2 and int(l1[6]) == 64 * 128 * 4
    assert "total" in lines and "passthrough: 2 tensors" in text

    plain = run("inspect", model.weights)
    assert plain.exit_code == 0 and "plain safetensors file, 4 tensors" in plain.stdout
    assert "l1.weight" in plain.stdout and "False" in plain.stdout  # dense weights are not 2:4


def test_reconstruct_rebuilds_dense_float32(factorized):
    model, out = factorized
    dense_path = model.dir / "dense.safetensors"
    result = run("reconstruct", out, "-o", dense_path)
    assert result.exit_code == 0, result.output
    dense, metadata = read_safetensors(dense_path)
    armor = load_armor(out)
    assert sorted(dense) == sorted(model.tensors) and metadata["format"] == "dense"
    for name in armor.names:
        assert dense[name].dtype == np.float32
        np.testing.assert_allclose(dense[name], armor.reconstruct(name), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dense["l1.bias"], model.tensors["l1.bias"])
    assert run("reconstruct", out).exit_code == 0  # default name next to the input
    assert (model.dir / "model.armor.dense.safetensors").exists()


def test_demo_runs_on_one_tensor_and_prints_the_comparison():
    result = run("demo", "--tensors", "*query.weight", "--sweeps-nowag", "1", "--sweeps-hessian", "1")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "encoder.layer.3.attention.self.query.weight  384x384" in text
    assert "2048 calibration / 1024 held-out tokens" in text
    for word in ("magnitude", "wanda", "nowag-p", "sparsegpt", "ARMOR (nowag", "ARMOR (hessian", "Summary"):
        assert word in text
    legend = text.split("Columns of the tables above")[1].split("Summary")[0]
    for column in ("nowag loss", "calib out err", "held-out err", "seconds"):
        assert column in legend  # every column of the tables is explained
    summary = text.split("Summary")[1].splitlines()
    row = next(line.split() for line in summary if line.strip().startswith("query"))
    loss_ratio, hessian_calib_ratio = float(row[1]), float(row[2])
    assert loss_ratio < 1 and hessian_calib_ratio < 1


@pytest.mark.parametrize("command", ["factorize", "prune", "inspect", "reconstruct", "export-dense", "demo"])
def test_every_command_has_a_teaching_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and "armor-ref " + command in result.stdout


def test_demo_help_promises_no_wall_time():
    """The demo's speed depends on BLAS threads and load; its help says so instead of promising a minute."""
    text = " ".join(run("demo", "--help").stdout.split())
    assert "minute" not in text and "--threads 1" in text and "CPU time" in text and "slower" in text


# ----------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, no traceback, no output, inputs untouched
# ----------------------------------------------------------------------------------------------------------
def _not_safetensors(m: SmallModel) -> list:
    m.weights.write_text("these are not tensors\n")
    return []


def _truncated(m: SmallModel) -> list:
    m.weights.write_bytes(m.weights.read_bytes()[:-100])
    return []


def _save_weights(m: SmallModel, **changes) -> None:
    save_file({**m.tensors, **changes}, str(m.weights))


def _nan_weights(m: SmallModel) -> list:
    W = m.tensors["l1.weight"].copy()
    W[3, 4] = np.nan
    _save_weights(m, **{"l1.weight": W})
    return []


def _inf_calib(m: SmallModel) -> list:
    X = m.X.copy()
    X[7, 1] = np.inf
    np.save(m.calib, X)
    return []


def _width_126(m: SmallModel) -> list:
    _save_weights(m, **{"l1.weight": np.ones((64, 126), np.float32)})
    np.save(m.calib, np.ones((10, 126), np.float32))
    return []


def _garbage_npy(m: SmallModel) -> list:
    m.calib.write_bytes(b"\x93NUMPY garbage")
    return []


def _calib_for_l2_only(m: SmallModel) -> list:
    np.savez(m.dir / "c.npz", **{"l2.weight": m.X})
    return ["--calib", m.dir / "c.npz"]


def _bad_heldout(m: SmallModel) -> list:
    np.savez(m.dir / "held.npz", **{"l1.weight": m.X})  # nothing for l2.weight
    return ["--heldout", m.dir / "held.npz"]


BAD_FACTORIZE = {
    "missing weights": (lambda m: m.weights.unlink() or [], [], "file not found"),
    "missing calibration": (lambda m: m.calib.unlink() or [], [], "calibration file not found"),
    "not safetensors": (_not_safetensors, [], "not a safetensors file"),
    "truncated": (_truncated, [], "truncated"),
    "1-D tensor selected": (lambda m: [], ["--tensors", "l1.bias"], "not a 2-D float matrix"),
    "unknown tensor selected": (lambda m: [], ["--tensors", "l9.weight"], "no tensor named"),
    "width not divisible by 4": (_width_126, ["--tensors", "l1.weight"], "not divisible by 4"),
    "block size does not divide": (lambda m: [], ["--block-size", "48"], "not divisible by block size 48"),
    "calibration width mismatch": (lambda m: np.save(m.calib, np.ones((10, 100))) or [], [], "dimension 100"),
    "NaN in weights": (_nan_weights, [], "NaN or Inf"),
    "Inf in calibration": (_inf_calib, [], "NaN or Inf"),
    "unreadable npy": (_garbage_npy, [], "cannot read calibration"),
    "output is the input": (lambda m: ["-o", m.weights], [], "is the input file"),
    "nothing to factorize": (lambda m: [], ["--tensors", "decoder.*"], "nothing to factorize"),
    "npz without tensor keys": (
        lambda m: np.savez(m.dir / "c.npz", foo=m.X) or ["--calib", m.dir / "c.npz"],
        [],
        "no key naming",
    ),
    "bad backend device": (lambda m: [], ["--device", "cuda"], "CPU only"),
    "held-out width mismatch": (_bad_heldout, [], "nothing for tensor"),
    "selected tensor without calibration": (
        _calib_for_l2_only,
        ["--tensors", "l1.weight"],
        "no key naming any of the tensors l1.weight;",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FACTORIZE))
def test_factorize_bad_input(tmp_path, case):
    model = make_small_model(tmp_path)
    prepare, extra, message = BAD_FACTORIZE[case]
    overrides = prepare(model)
    calib_args = [] if "--calib" in overrides else ["--calib", model.calib]
    before = snapshot(tmp_path)
    result = run("factorize", model.weights, *calib_args, *FAST, *extra, *overrides)
    assert_clean_failure(result, message)
    assert snapshot(tmp_path) == before  # no output or report written, inputs byte for byte unchanged


BAD_OTHER = {
    "prune: missing method": (lambda m: ["prune", m.weights, "--calib", m.calib], "Missing option"),
    "prune: output is input": (
        lambda m: ["prune", m.weights, "--calib", m.calib, "--method", "wanda", "-o", m.calib],
        "is the input",
    ),
    "prune: width mismatch": (
        lambda m: np.save(m.calib, np.ones((9, 64))) or ["prune", m.weights, "--calib", m.calib, "--method", "wanda"],
        "dimension 64",
    ),
    "inspect: not safetensors": (lambda m: ["inspect", m.calib], "not a safetensors file"),
    "inspect: missing": (lambda m: ["inspect", m.dir / "none.safetensors"], "file not found"),
    "reconstruct: plain file": (lambda m: ["reconstruct", m.weights], "not an ARMOR file"),
    "reconstruct: output is input": (lambda m: ["reconstruct", m.weights, "-o", m.weights], "is the input"),
}


@pytest.mark.parametrize("case", list(BAD_OTHER))
def test_other_commands_bad_input(tmp_path, case):
    model = make_small_model(tmp_path)
    make_args, message = BAD_OTHER[case]
    args = make_args(model)
    before = snapshot(tmp_path)
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before


def assert_clean_failure(result, message: str) -> None:
    assert result.exit_code == EXIT_INPUT, result.output
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "; " in lines[0]
    assert message in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""

"""Two-stream compression (issue 13): the low-rank methods (svd, svd-llm, aa-svd), ARMOR on the anchored objective,
and the block refinement, through the whole pipeline on tiny random models.

What is checked: the stored layout, ranks, header and config of low-rank directories and that they load (and export)
to exactly the stored ``U V``; that the anchored errors the report gives are the ones measured on the saved model
against the dense one (so the pipeline's ``X``, ``X'``, ``G``, ``G'``, ``C`` are the right ones); that ARMOR anchored
keeps its guarantee per layer; that the refinement keeps every 2:4 mask (exact 2:4, same masks as without it), keeps
``A = B = I`` for a plain baseline, lowers the block loss it reports, and that this loss is the saved model's; that a
refined two-stream run resumes to the same bytes; and that bad ``--ratio`` / ``--refine-epochs`` are one-line errors.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_compress import all_tensors, torchrun_compress  # noqa: E402
from test_models import make_tiny_model, sample_text  # noqa: E402

from armor_ref.lowrank import rank_for_ratio  # noqa: E402
from armor_ref.masks import has_two_per_group, unpack_2of4  # noqa: E402
from toolkit.cli import cli  # noqa: E402
from toolkit.compress import CompressSettings, calibration_windows, compress_model  # noqa: E402
from toolkit.errors import EXIT_INPUT  # noqa: E402
from toolkit.models import load_model, load_tokenizer  # noqa: E402
from toolkit.refine import FINAL_LR_FRACTION, LEARNING_RATE, default_epochs, learning_rate  # noqa: E402

FAST = {"nsamples": 8, "seqlen": 32, "block_size": 16}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("two-streams")
    (d / "calib.txt").write_text(sample_text(seed=0))
    make_tiny_model("llama", str(d / "llama"), shards=True)
    make_tiny_model("bert", str(d / "bert"))
    return d


_RUNS: dict[str, tuple] = {}


def compressed(workdir, model: str, method: str, **settings) -> tuple:
    """``(out_dir, report)`` of ``model`` compressed with ``method`` (cached per module)."""
    key = f"{model}-{method}-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items()))
    if key not in _RUNS:
        out = workdir / key
        options = {**FAST, **settings}
        report = compress_model(
            str(workdir / model),
            str(out),
            str(workdir / "calib.txt"),
            CompressSettings(method, **options),
            progress=False,
        )
        _RUNS[key] = (out, report)
    return _RUNS[key]


def calibration_batches(workdir, model: str) -> list:
    """The pipeline's calibration windows for ``model``, in its batches of 8 (the default ``batch_size``)."""
    windows = calibration_windows(load_tokenizer(str(workdir / model)), (workdir / "calib.txt").read_text(), 8, 32, 0)
    return [torch.from_numpy(windows[i : i + 8]) for i in range(0, len(windows), 8)]


def inputs_of(model, module_name: str, batches: list) -> torch.Tensor:
    """The inputs ``module_name`` receives over the calibration batches, (tokens, d_in) float64."""
    captured = []
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in captured]).double()


# ----------------------------------------------------------------------------------------------------------
# low-rank directories
# ----------------------------------------------------------------------------------------------------------
def test_lowrank_output_layout_header_config_and_loading(workdir):
    out, report = compressed(workdir, "llama", "aa-svd", ratio=0.5, refine_epochs=0)
    tensors = all_tensors(out)
    dense = load_model(str(workdir / "llama"))
    stems = sorted({n.split(".lowrank.")[0] for n in tensors if ".lowrank." in n})
    assert len(stems) == 2 * 7 == report["linears"] and not any(".armor." in n for n in tensors)
    modules = dict(dense.named_modules())
    for stem, layer in zip(stems, sorted(report["layers"], key=lambda entry: entry["name"]), strict=True):
        d_out, d_in = modules[stem].weight.shape
        k = rank_for_ratio(0.5, d_out, d_in)
        U, V = tensors[f"{stem}.lowrank.U"], tensors[f"{stem}.lowrank.V"]
        assert U.dtype == V.dtype == np.float32 and U.shape == (d_out, k) and V.shape == (k, d_in)
        assert k * (d_out + d_in) <= 0.5 * d_out * d_in and layer["rank"] == k and f"{stem}.weight" not in tensors
        assert 0 < layer["relative_anchored_error"] < 1 and 0 < layer["relative_output_error"] < 1
        modules[stem].weight.data.copy_(torch.from_numpy(U.astype(np.float64) @ V.astype(np.float64)))
    with safe_open(str(out / "model-block-00000.safetensors"), framework="np") as fh:
        header = fh.metadata()
    assert header["format"] == "armor" and header["proxy"] == "aa-svd" and header["ratio"] == "0.5"
    assert header["lowrank_layout"].startswith("NAME.lowrank.U (d_out, k)") and header["refine_epochs"] == "0"
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["modules"] == stems and quantization["method"] == "aa-svd"
    assert quantization["lowrank"] == {stem: int(tensors[f"{stem}.lowrank.U"].shape[1]) for stem in stems}
    model = load_model(str(out))
    q = model.model.layers[1].self_attn.q_proj
    assert (
        type(q).__name__ == "LowRankLinear" and q.rank == tensors["model.layers.1.self_attn.q_proj.lowrank.U"].shape[1]
    )
    ids = torch.randint(5, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_lowrank_inspect_and_export_dense(workdir, tmp_path):
    out, _ = compressed(workdir, "llama", "aa-svd", ratio=0.5, refine_epochs=0)
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and "model.layers.0.mlp.down_proj" in result.output and "linears" in result.output
    assert "2:4" not in result.output.split("\n")[1]  # no ARMOR table for a directory without ARMOR layers
    result = CliRunner().invoke(cli, ["export-dense", str(out), "-o", str(tmp_path / "dense")])
    assert result.exit_code == 0, result.output
    exported = all_tensors(tmp_path / "dense")
    tensors = all_tensors(out)
    stem = "model.layers.1.mlp.gate_proj"
    U, V = tensors[f"{stem}.lowrank.U"].astype(np.float64), tensors[f"{stem}.lowrank.V"].astype(np.float64)
    np.testing.assert_allclose(exported[f"{stem}.weight"], U @ V, rtol=1e-6, atol=1e-7)
    assert not any(".lowrank." in name for name in exported)


def test_reported_anchored_errors_are_measured_on_the_saved_model(workdir):
    """``‖X Wᵀ − X' Ŵᵀ‖² / ‖X Wᵀ‖²`` from the activations of the dense model (``X``) and of the saved compressed
    model (``X'``) on the calibration windows equals the report's, for linears of both blocks; in the first group of
    block 0 both streams are one (``X' = X``) and it equals the relative output error."""
    out, report = compressed(workdir, "llama", "aa-svd", ratio=0.5, refine_epochs=0)
    layers = {layer["name"]: layer for layer in report["layers"]}
    batches = calibration_batches(workdir, "llama")
    dense, model = load_model(str(workdir / "llama")), load_model(str(out))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        X, X_shift = inputs_of(dense, name, batches), inputs_of(model, name, batches)
        W = dict(dense.named_modules())[name].weight.detach().double()
        W_hat = dict(model.named_modules())[name].to_dense().detach().double()
        measured = float(((X @ W.T - X_shift @ W_hat.T) ** 2).sum() / ((X @ W.T) ** 2).sum())
        assert measured == pytest.approx(layers[name]["relative_anchored_error"], rel=1e-6), name
    first = layers["model.layers.0.self_attn.q_proj"]
    assert first["relative_anchored_error"] == pytest.approx(first["relative_output_error"], rel=1e-9)
    later = layers["model.layers.1.self_attn.v_proj"]
    assert later["relative_anchored_error"] != pytest.approx(later["relative_output_error"], rel=1e-3)


def test_armor_anchored_keeps_its_guarantee_on_every_layer(workdir):
    _, report = compressed(workdir, "llama", "armor-anchored", sweeps=2, refine_epochs=0)
    for layer in report["layers"]:
        assert layer["init"] == "sparsegpt" and layer["loss"] <= layer["baseline_loss"] * (1 + 1e-9)
        assert 0 <= layer["relative_anchored_error"] < 1


# ----------------------------------------------------------------------------------------------------------
# block refinement
# ----------------------------------------------------------------------------------------------------------
def cores(tensors: dict, block: int) -> dict[str, tuple]:
    return {
        name.removesuffix(".armor.index"): unpack_2of4(tensors[name.replace(".index", ".values")], value)
        for name, value in tensors.items()
        if name.endswith(".armor.index") and f".{block}." in name
    }


@pytest.mark.parametrize("method", ["armor-hessian", "sparsegpt"])
def test_refinement_keeps_the_masks_exact_2of4_and_lowers_the_block_loss(workdir, method):
    """Block 0 is compressed identically with and without refinement; refined, every core is still exactly 2:4 on
    the same mask, values changed; a plain baseline keeps ``A = B = I``; norms are refined; the block loss fell."""
    plain_out, _ = compressed(workdir, "bert", method, sweeps=2, refine_epochs=0)
    out, report = compressed(workdir, "bert", method, sweeps=2, refine_epochs=30)
    before, after = all_tensors(plain_out), all_tensors(out)
    for name, (core, mask) in cores(after, 0).items():
        plain_core, plain_mask = cores(before, 0)[name]
        assert has_two_per_group(mask) and np.all(core[~mask] == 0)
        np.testing.assert_array_equal(mask, plain_mask)
        assert not np.array_equal(core, plain_core)
        if method == "sparsegpt":
            eye = np.eye(16, dtype=np.float32)
            assert np.all(after[f"{name}.armor.A"] == eye) and np.all(after[f"{name}.armor.B"] == eye)
    norm = "encoder.layer.0.attention.output.LayerNorm.weight"
    assert not np.array_equal(after[norm], before[norm])
    for block in report["blocks"]:
        refine = block["refine"]
        assert refine["steps"] == 30 and refine["epochs"] == 30  # 8 windows: one step of up to 32 per epoch
        assert refine["block_loss_after"] < refine["block_loss_before"] and not refine["reverted"]
    assert report["seconds_refine"] > 0


def test_the_reported_block_loss_is_the_saved_models(workdir):
    """``MSE(block'(X'), block(X))`` of block 1, measured with the saved refined model and the dense one on the
    calibration windows, is the loss the report gives after the refinement."""
    out, report = compressed(workdir, "bert", "armor-hessian", sweeps=2, refine_epochs=30)
    batches = calibration_batches(workdir, "bert")

    def block_io(model) -> tuple[torch.Tensor, torch.Tensor]:
        got = []
        handle = model.encoder.layer[1].register_forward_hook(lambda m, args, output: got.append(output))
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        handle.remove()
        return torch.cat([o[0] if isinstance(o, tuple) else o for o in got])

    dense, model = block_io(load_model(str(workdir / "bert"))), block_io(load_model(str(out)))
    measured = float(((model - dense) ** 2).double().mean())
    assert measured == pytest.approx(report["blocks"][1]["refine"]["block_loss_after"], rel=1e-4)


def test_a_refinement_that_does_not_help_is_undone(workdir, tmp_path, monkeypatch):
    """With a learning rate 10⁴ times too large the refinement raises the block loss: it is undone, and the stored
    tensors are exactly those of the run without refinement."""
    import toolkit.refine

    plain_out, _ = compressed(workdir, "bert", "sparsegpt", refine_epochs=0)
    monkeypatch.setattr(toolkit.refine, "LEARNING_RATE", 1.0)
    settings = CompressSettings("sparsegpt", **FAST, refine_epochs=3)
    report = compress_model(
        str(workdir / "bert"), str(tmp_path / "out"), str(workdir / "calib.txt"), settings, progress=False
    )
    assert all(block["refine"]["reverted"] for block in report["blocks"])
    assert all(
        block["refine"]["block_loss_after"] == block["refine"]["block_loss_before"] for block in report["blocks"]
    )
    plain, got = all_tensors(plain_out), all_tensors(tmp_path / "out")
    assert plain.keys() == got.keys()
    for name, value in plain.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_refined_two_stream_run_resumes_to_the_same_bytes(workdir, tmp_path):
    reference, _ = compressed(workdir, "llama", "armor-anchored", sweeps=2, refine_epochs=2, lm_head=True)
    settings = CompressSettings("armor-anchored", **FAST, sweeps=2, refine_epochs=2, lm_head=True)
    out = tmp_path / "out"

    class Interrupted(Exception):
        pass

    def stop(i: int) -> None:
        raise Interrupted

    args = (str(workdir / "llama"), str(out), str(workdir / "calib.txt"), settings)
    with pytest.raises(Interrupted):
        compress_model(*args, on_block_done=stop, progress=False)
    manifest = json.loads((out / "armor_manifest.json").read_text())
    stream = load_file(str(out / manifest["progress"]["stream"]["file"]))
    assert {n.split(".")[0] for n in stream} == {"hidden", "original"}  # both streams saved
    assert not np.array_equal(stream["hidden.00000"], stream["original.00000"])
    compress_model(*args, resume=True, progress=False)
    names = sorted(f for f in os.listdir(reference) if f.endswith((".safetensors", "config.json")))
    assert names == sorted(f for f in os.listdir(out) if f.endswith((".safetensors", "config.json")))
    for name in names:
        assert (reference / name).read_bytes() == (out / name).read_bytes(), name


def test_default_epochs_and_the_learning_rate_schedule():
    assert default_epochs(8) == 200 and default_epochs(64) == 100 and default_epochs(256) == 25
    assert default_epochs(100_000) == 1
    assert CompressSettings("aa-svd", nsamples=64, ratio=0.5).epochs == 100
    assert CompressSettings("armor-hessian", nsamples=64).epochs == 0
    assert CompressSettings("armor-hessian", refine_epochs=3).epochs == 3
    rates = [learning_rate(step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(LEARNING_RATE / 10) and rates[9] == pytest.approx(LEARNING_RATE)
    assert all(a < b for a, b in zip(rates[:10], rates[1:10], strict=False))  # warm-up: 10 % of the steps
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))  # then a cosine down
    assert rates[-1] == pytest.approx(FINAL_LR_FRACTION * LEARNING_RATE)


# ----------------------------------------------------------------------------------------------------------
# bad options
# ----------------------------------------------------------------------------------------------------------
BAD_OPTIONS = {
    "ratio zero": (["--method", "aa-svd", "--ratio", "0"], "--ratio 0.0 is outside (0, 1]"),
    "ratio above one": (["--method", "svd", "--ratio", "1.5"], "--ratio 1.5 is outside (0, 1]"),
    "ratio not a number": (["--method", "svd", "--ratio", "half"], "'half' is not a valid float"),
    "ratio nan": (["--method", "svd", "--ratio", "nan"], "--ratio nan is outside (0, 1]"),
    "ratio missing": (["--method", "svd-llm"], "--method svd-llm needs --ratio"),
    "ratio for a 2:4 method": (["--method", "sparsegpt", "--ratio", "0.5"], "--ratio applies to the low-rank"),
    "ratio too small for a layer": (["--method", "aa-svd", "--ratio", "0.01"], "raise the ratio to at least"),
    "negative epochs": (["--method", "armor-hessian", "--refine-epochs", "-1"], "--refine-epochs must not be"),
    "epochs not a number": (["--method", "svd", "--ratio", "0.5", "--refine-epochs", "x"], "'x' is not a valid"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_ratio_and_refine_epochs_are_one_line_errors(workdir, tmp_path, case):
    options, message = BAD_OPTIONS[case]
    out = tmp_path / "out"
    args = ["compress", str(workdir / "llama"), "-o", str(out), "--calib-text", str(workdir / "calib.txt"), "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--nsamples", "4", "--seqlen", "16", "--block-size", "16", *options])
    assert result.exit_code == EXIT_INPUT, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_two_gloo_processes_give_the_single_process_two_stream_result(workdir):
    """torchrun with 2 CPU processes (gloo), AA-SVD with refinement: the linears of a group are solved on different
    ranks, rank 0 refines and shares the refined block; the files equal the single process's."""
    reference, _ = compressed(workdir, "bert", "aa-svd", ratio=0.5, refine_epochs=3)
    out = workdir / "bert-dist-two-streams"
    proc = torchrun_compress(workdir, out, 29519, "--method", "aa-svd", "--ratio", "0.5", "--refine-epochs", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "armor_report.json").read_text())
    assert report["world_size"] == 2 and all("refine" in block for block in report["blocks"])
    a, b = all_tensors(reference), all_tensors(out)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)

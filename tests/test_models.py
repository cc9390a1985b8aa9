"""Model directories: layouts, loading, the spec §6 shards and the ArmorLinear module.

The tiny models here are built offline from local configs (random init, a word-level tokenizer trained on nothing
but a fixed word list), so these tests need no download and no installed checkpoint.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from toolkit.models import (  # noqa: E402
    BERT_LAYOUT,
    LLAMA_LAYOUT,
    ArmorError,
    blocks_of,
    checkpoint_name,
    layout_of,
    load_block,
    load_model,
    load_model_skeleton,
    module_names,
    read_config,
    release_block,
    tensor_locations,
    weight_files,
)

WORDS = (
    "the of and to a in is for that this with are be as on it by an or from not can which at will if when "
    "python function module class object value return list string file data type method name default error "
    "argument call set new use used code number first each other more than only also into"
).split()


def sample_text(n_words: int = 6000, seed: int = 0) -> str:
    """Deterministic pseudo-English from :data:`WORDS` (Zipf-like frequencies), in paragraphs."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(WORDS) + 1)
    words = rng.choice(WORDS, size=n_words, p=p / p.sum())
    paragraphs = [" ".join(words[i : i + 60]) + "." for i in range(0, n_words, 60)]
    return "\n\n".join(paragraphs)


def save_word_tokenizer(out_dir: str) -> None:
    """A word-level fast tokenizer over :data:`WORDS` with BERT-style special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["."])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(out_dir)


# Llama-layout architectures: Llama; Qwen2 (biases on q/k/v); Qwen3 (q/k norms, tied LM head); Mistral
CAUSAL_KINDS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def make_tiny_model(
    kind: str, out_dir: str, layers: int = 2, hidden: int = 64, seed: int = 0, shards: bool = False
) -> str:
    """Save a random tiny ``bert`` or Llama-layout (:data:`CAUSAL_KINDS`) checkpoint with its tokenizer to
    ``out_dir``; return it."""
    torch.manual_seed(seed)
    vocab = 128  # > the word-level tokenizer's vocabulary
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
        )
        model = transformers.BertModel(config)
    elif kind in CAUSAL_KINDS:
        config_class, model_class = CAUSAL_KINDS[kind]
        config = getattr(transformers, config_class)(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            tie_word_embeddings=kind == "qwen3",  # Qwen3's small models tie the LM head to the embeddings
        )
        model = getattr(transformers, model_class)(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(out_dir, max_shard_size="100KB" if shards else "5GB")
    save_word_tokenizer(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
def test_layouts_list_linears_in_forward_order():
    assert BERT_LAYOUT.linears[:3] == ("attention.self.query", "attention.self.key", "attention.self.value")
    assert LLAMA_LAYOUT.linears[-1] == "mlp.down_proj"
    for model_type in ("llama", "qwen2", "qwen3", "mistral"):
        assert layout_of({"model_type": model_type}) is LLAMA_LAYOUT
    with pytest.raises(ArmorError, match="unsupported architecture 'gpt2'"):
        layout_of({"model_type": "gpt2"})


def test_bad_directories_give_one_line_errors(tmp_path):
    with pytest.raises(ArmorError, match="does not exist"):
        read_config(str(tmp_path / "nope"))
    with pytest.raises(ArmorError, match="no config.json"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArmorError, match="cannot read"):
        read_config(str(tmp_path))
    with pytest.raises(ArmorError, match="has no model.safetensors"):
        weight_files(str(tmp_path))


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    d = make_tiny_model("llama", str(tmp_path / "m"), shards=True)
    files = weight_files(d)
    assert len(files) > 1 and os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    locations = tensor_locations(d)
    assert "model.layers.1.mlp.down_proj.weight" in locations
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    assert set(locations) == set(index["weight_map"])


def test_checkpoint_name_maps_model_parameters_to_stored_names():
    stored = {"bert.encoder.layer.0.output.dense.weight", "lm_head.weight"}
    assert checkpoint_name("encoder.layer.0.output.dense.weight", stored) == "bert.encoder.layer.0.output.dense.weight"
    assert checkpoint_name("lm_head.weight", stored) == "lm_head.weight"
    assert checkpoint_name("x.y", stored) is None


def test_blocks_are_found_in_both_tiny_models(tmp_path):
    for kind in ("bert", "llama"):
        d = make_tiny_model(kind, str(tmp_path / kind))
        model, layout = load_model(d), layout_of(read_config(d))
        blocks = blocks_of(model, layout)
        assert len(blocks) == 2
        for rel in layout.linears:  # every listed linear exists
            module = blocks[0]
            for part in rel.split("."):
                module = getattr(module, part)
            assert isinstance(module, torch.nn.Linear)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_streamed_model_equals_the_fully_loaded_one_block_by_block(tmp_path, kind):
    """The skeleton holds no block weight; loading its blocks one by one rebuilds every tensor of
    ``from_pretrained``'s model exactly (recomputed buffers such as rotary tables and position ids included), and
    releasing a block frees it again."""
    d = make_tiny_model(kind, str(tmp_path / kind), layers=3, shards=kind == "llama")
    dense, layout = load_model(d), layout_of(read_config(d))
    expected = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
    model, _, locations = load_model_skeleton(d)
    blocks = blocks_of(model, layout)
    assert all(p.is_meta for p in blocks.parameters())
    outside = [n for n, p in model.named_parameters() if not p.is_meta]
    assert outside and not any(n.startswith(("encoder.layer", "model.layers")) for n in outside)
    names = module_names(model)
    for block in blocks:
        load_block(model, block, locations, "cpu")
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            assert torch.equal(t, expected[f"{names[id(block)]}.{name}"]), name
        assert sum(not p.is_meta for b in blocks for p in b.parameters()) == len(list(block.parameters()))
        release_block(block)
        assert all(p.is_meta for p in block.parameters())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_meta:
            assert torch.equal(t, expected[name]), name


def test_a_checkpoint_missing_a_block_tensor_fails_when_its_block_is_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    d = make_tiny_model("bert", str(tmp_path / "bert"))
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    victim = next(n for n in tensors if "layer.1.output.dense.weight" in n)
    del tensors[victim]
    save_file(tensors, path, metadata={"format": "pt"})
    model, layout, locations = load_model_skeleton(d)
    blocks = blocks_of(model, layout)
    load_block(model, blocks[0], locations, "cpu")
    with pytest.raises(ArmorError, match="the checkpoint lacks .*layer.1.output.dense.weight"):
        load_block(model, blocks[1], locations, "cpu")

"""Hugging Face GPT-2 checkpoints in our GPT (gpt2.py), checked against transformers itself."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download: every checkpoint here is built by the test
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

import conftest

transformers = pytest.importorskip("transformers")

from loralab.data import PretrainedTokenizer
from loralab.gpt2 import gpt2_state_dict, load_gpt2

TINY = dict(vocab_size=101, n_positions=24, n_embd=32, n_layer=2, n_head=2)


def tiny_hf_gpt2(seed=0, **overrides):
    return conftest.tiny_hf_gpt2(seed, **{**TINY, **overrides})


def assert_same_logits(ours, theirs, vocab_size, block_size, atol=1e-4):
    idx = torch.randint(0, vocab_size, (2, block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(idx).logits
        logits, _ = ours.eval()(idx)
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("sizes", [
    dict(),
    dict(tie_word_embeddings=False),
    dict(vocab_size=77, n_positions=40, n_embd=48, n_layer=3, n_head=4),
])
def test_logits_match_transformers(tmp_path, sizes):
    hf = tiny_hf_gpt2(**sizes)
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    c = hf.config
    assert (ours.config.vocab_size, ours.config.block_size, ours.config.n_layer, ours.config.n_head,
            ours.config.n_embd, ours.config.tie_weights) == (c.vocab_size, c.n_positions, c.n_layer, c.n_head,
                                                             c.n_embd, c.tie_word_embeddings)
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == c.tie_word_embeddings
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert_same_logits(ours, hf, c.vocab_size, c.n_positions)


def test_loaded_model_trains(tmp_path):
    tiny_hf_gpt2().save_pretrained(tmp_path)
    model = load_gpt2(tmp_path)
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
    loss.backward()
    assert model.transformer.h[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_original_hub_layout_pytorch_model_bin(tmp_path):
    """The original GPT-2 files: a pickled GPT2Model state dict (no ``transformer.`` prefix) with
    the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` in it."""
    hf = tiny_hf_gpt2()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    T = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, T, T).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    assert_same_logits(load_gpt2(tmp_path), hf, TINY["vocab_size"], T)


def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_logits(load_gpt2(tmp_path), hf, TINY["vocab_size"], TINY["n_positions"])


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_state_dict_inverts_load(tmp_path, tie):
    hf = tiny_hf_gpt2(tie_word_embeddings=tie)
    hf.save_pretrained(tmp_path)
    ours = gpt2_state_dict(load_gpt2(tmp_path))
    theirs = {k: v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_gpt2(tmp_path)
    tiny_hf_gpt2().config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no GPT-2 weights"):
        load_gpt2(tmp_path)


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("n_inner", 100),
                                        ("layer_norm_epsilon", 1e-6), ("scale_attn_by_inverse_layer_idx", True)])
def test_unsupported_options_are_refused(tmp_path, key, value):
    tiny_hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=key):
        load_gpt2(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    tiny_hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(ValueError, match="do not fit"):
        load_gpt2(tmp_path)


def train_byte_level_bpe():
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    text = ["def load(path):\n    return open(path).read()", "The quick brown fox jumps over the lazy dog."] * 20
    tokenizer.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return tokenizer


def test_tokenizer_json_from_disk(tmp_path):
    reference = train_byte_level_bpe()
    reference.save(str(tmp_path / "tokenizer.json"))
    tokenizer = PretrainedTokenizer.from_directory(tmp_path)
    text = "The lazy fox reads a path:\n\tdef dog(): return 42 — naïve"
    assert tokenizer.encode(text) == reference.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocab_and_merges_tokenize_as_transformers_gpt2_tokenizer(tmp_path):
    """The older GPT-2 files, read with `tokenizers` alone, against transformers' own
    (pure Python) GPT2Tokenizer reading the same files."""
    train_byte_level_bpe().save_model(str(tmp_path))
    reference = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tokenizer = PretrainedTokenizer.from_directory(tmp_path)
    text = "The lazy fox reads a path:\n\tdef dog(): return 42 — naïve  spaces"
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_no_tokenizer_is_none(tmp_path):
    assert PretrainedTokenizer.from_directory(tmp_path) is None

"""A local Hugging Face GPT-2 directory through `train.py` end to end, then exported back
to Hugging Face: as a PEFT adapter and as a merged checkpoint."""

import pytest
import torch

from conftest import TINY, compose, run_train, tiny_hf_gpt2
from conftest import read_summary as summary

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # fine-tunes through train.py
tokenizers = pytest.importorskip("tokenizers")

from loralab.data import PretrainedTokenizer, pydoc_topics_text
from loralab.export import load_finetuned
from loralab.export import main as export


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with its own byte-level BPE tokenizer, both saved as a user's would be."""
    directory = tmp_path_factory.mktemp("gpt2")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([pydoc_topics_text()[:50_000]], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    tiny_hf_gpt2(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2
                 ).save_pretrained(directory)
    return directory


def test_gpt2_checkpoint_fine_tunes_through_train_py_and_exports(tmp_path, gpt2_dir):
    run_dir = tmp_path / "run"
    shrink = [o for o in TINY if not o.startswith(("model=", "base."))]
    run_train(["model=gpt2", f"model.pretrained={gpt2_dir}", *shrink, "lora.rank=2", "logger=none",
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    s = summary(run_dir)
    assert s["status"] == "completed", s["error"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    m = s["metrics"]
    assert m["params/total"] == hf.num_parameters() + m["params/lora_analytic"]  # sizes from config.json
    assert m["params/lora_analytic"] == 2 * 2 * 2 * (32 + 32)  # layers · (q, v) · r · (in + out)

    ours, lora_config, _ = load_finetuned(run_dir)
    ours.eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(idx)[0]
        assert (expected - hf(idx).logits).abs().max() > 1e-4  # the adapter changed the model

        export([str(run_dir), "--peft", str(tmp_path / "peft")])
        with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
        torch.testing.assert_close(with_adapter(idx).logits, expected, atol=1e-5, rtol=0)

        export([str(run_dir), "--merged", str(tmp_path / "merged")])
        merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(idx).logits, expected, atol=1e-5, rtol=0)


def test_the_checkpoints_own_tokenizer_is_used(tmp_path, gpt2_dir):
    from loralab.data import tokenizer_of

    cfg = compose(["model=gpt2", f"model.pretrained={gpt2_dir}", f"paths.output_dir={tmp_path}"])
    used = tokenizer_of(cfg.model.pretrained)
    saved = tokenizers.Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    assert isinstance(used, PretrainedTokenizer)
    text = "def f(x):\n    return x"
    assert used.encode(text) == saved.encode(text).ids != list(text.encode())


def test_export_of_something_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        export([str(tmp_path), "--peft", str(tmp_path / "out")])
    assert exit.value.code == 2 and "is not a completed LoRA run" in capsys.readouterr().err

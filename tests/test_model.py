"""The from-scratch GPT (model.py): shapes, GPT-2 size, KV cache, and LoRA training on real text."""

import json
from pathlib import Path

import pytest
import torch

from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPT, GPTConfig

TINY = dict(vocab_size=256, block_size=24, n_layer=2, n_head=2, n_embd=32)


def test_gpt2_small_parameter_count():
    # GPT-2 small as Hugging Face counts it, with the lm_head tied to wte.
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_parameter_count_matches_analytic_formula():
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY))
    V, T, L, C = 256, 24, 2, 32
    per_block = 2 * 2 * C + 4 * (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert sum(p.numel() for p in model.parameters()) == V * C + T * C + L * per_block + 2 * C


def test_loss_is_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 256, (3, 10))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (3, 9, 256)
    log_probs = logits.log_softmax(-1)
    by_hand = -log_probs.gather(-1, idx[:, 1:, None]).mean()
    torch.testing.assert_close(loss, by_hand)


def test_causality_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    a = torch.randint(0, 256, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 256
    torch.testing.assert_close(model(a)[0][:, :8], model(b)[0][:, :8])


def test_cached_forward_in_chunks_equals_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 256, (2, 20))
    full, _ = model(idx)
    cache = []
    chunks = [model(idx[:, s:e], cache=cache)[0] for s, e in ((0, 7), (7, 8), (8, 15), (15, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("new_tokens", [5, 40])  # 40 runs past block_size=24: the context is cropped
def test_greedy_generation_with_and_without_cache_agree(new_tokens):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    prompt = torch.randint(0, 256, (2, 6))
    with_cache = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    without = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 6 + new_tokens)
    assert torch.equal(with_cache, without)
    # greedy really is the argmax of the model's next-token logits
    assert torch.equal(without[:, 6], model(prompt)[0][:, -1].argmax(-1))


def test_top_k_sampling_stays_in_the_top_k():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    prompt = torch.randint(0, 256, (64, 4))
    allowed = model(prompt)[0][:, -1].topk(3).indices
    sampled = model.generate(prompt, 1, temperature=1.5, top_k=3)[:, -1]
    assert (allowed == sampled[:, None]).any(-1).all()


def test_too_long_input_is_a_clear_error():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("field,value", [("n_layer", 0), ("n_embd", 33), ("dropout", 1.5), ("vocab_size", "x")])
def test_invalid_gpt_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, field: value})


def byte_batches(path, seed, batch_size=16, length=25):
    data = torch.tensor(list(Path(path).read_bytes()[:8000]), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - length, (batch_size,), generator=g)
        chunk = torch.stack([data[s:s + length] for s in starts])
        yield chunk[:, :-1], chunk[:, 1:]


def train(model, batches, steps, lr):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _, (x, y) in zip(range(steps), batches):
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_training_on_real_text_lowers_the_loss():
    """Pretrain briefly on one stdlib module, then train only LoRA on another."""
    import textwrap

    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    train(model, byte_batches(json.__file__, seed=0), steps=100, lr=3e-3)
    inject_lora(model, LoRAConfig(rank=8, alpha=16, target_modules="all-linear"))
    eval_x, eval_y = next(byte_batches(textwrap.__file__, seed=123, batch_size=64))
    with torch.no_grad():
        before = model(eval_x, eval_y)[1].item()
    train(model, byte_batches(textwrap.__file__, seed=1), steps=100, lr=3e-3)
    with torch.no_grad():
        after = model(eval_x, eval_y)[1].item()
    assert after < before - 0.1, (before, after)

"""Our LoRA (lora.py) against PEFT's on the same GPT with the same A and B: outputs, gradients, merges.

PEFT wraps our GPT directly: it targets ``nn.Linear`` modules by name.
"""

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

peft = pytest.importorskip("peft")

from loralab.lora import LoRAConfig, inject_lora, lora_layers, merge_lora
from loralab.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["fc_in", "fc_out"]]
ALPHA = 5.0  # unlike any rank, so scale = alpha / r and alpha / sqrt(r) differ from 1 and each other


def twin_models(rank, scaling, targets, seed=0):
    """Our LoRA and PEFT's on copies of one GPT, holding the same non-zero A and B."""
    torch.manual_seed(seed)
    base = GPT(TINY)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(rank=rank, alpha=ALPHA, target_modules=targets, scaling=scaling))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=ALPHA, target_modules=targets, use_rslora=scaling == "rslora"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)  # B = 0 would test nothing
            twin = peft_layer(theirs, name)
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
    return base, ours, theirs


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, TINY.vocab_size, (3, TINY.block_size), generator=g),
            torch.randint(0, TINY.vocab_size, (3, TINY.block_size), generator=g))


@pytest.mark.parametrize("targets", TARGETS, ids=["qv", "qkvo", "mlp"])
@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_outputs_and_gradients_match_peft(scaling, rank, targets):
    base, ours, theirs = twin_models(rank, scaling, targets)
    idx, targets_ = batch()
    logits, loss = ours(idx, targets_)
    peft_logits, peft_loss = theirs(idx, targets_)
    assert (logits - base(idx)[0]).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(logits, peft_logits, atol=1e-6, rtol=0)
    loss.backward()
    peft_loss.backward()
    for name, layer in lora_layers(ours).items():
        twin = peft_layer(theirs, name)
        assert layer.scale == twin.scaling["default"]
        torch.testing.assert_close(layer.lora_A.grad, twin.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, twin.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-5)
    trainable = {n.replace("base_model.model.", "").replace(".default.weight", "") for n, p in theirs.named_parameters()
                 if p.requires_grad}
    assert trainable == {n for n, p in ours.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", TARGETS, ids=["qv", "qkvo", "mlp"])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_merged_weights_match_peft(scaling, targets):
    _, ours, theirs = twin_models(4, scaling, targets)
    merge_lora(ours)
    merged = theirs.merge_and_unload()
    expected = merged.state_dict()
    for key, value in ours.state_dict().items():
        if "lora_" not in key:
            torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    idx, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], merged(idx)[0], atol=1e-5, rtol=0)

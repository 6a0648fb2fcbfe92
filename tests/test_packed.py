"""The packed core against the same jobs trained alone, with lora.py's own LoRALinear."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from loralab.adapters import lora_state_dict
from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPT, GPTConfig
from loralab.packed import JobSpec, Pack, unpackable
from loralab.schedule import warmup_cosine

STEPS = 6
B, T = 3, 16

# two ranks, two seeds; one job with another lr, alpha, scaling and targets (all-linear)
JOBS = {
    "r2s1": JobSpec(LoRAConfig(rank=2), seed=1, lr=1e-2, max_steps=STEPS, warmup_steps=2, gradient_clip_val=1.0),
    "r2s2": JobSpec(LoRAConfig(rank=2), seed=2, lr=1e-2, max_steps=STEPS, warmup_steps=2, gradient_clip_val=1.0),
    "r4s1": JobSpec(LoRAConfig(rank=4, alpha=8, scaling="rslora", target_modules="all-linear", init="gaussian"),
                    seed=1, lr=3e-3, max_steps=STEPS, weight_decay=0.1, warmup_steps=2, gradient_clip_val=0.05),
    "r4s2": JobSpec(LoRAConfig(rank=4, target_modules=["v_proj", "fc_in"]), seed=2, lr=1e-2, max_steps=STEPS),
}


def tiny_base() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=T, n_layer=2, n_head=2, n_embd=32))


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + seed)
    ids = [torch.randint(0, 64, (B, T + 1), generator=g) for _ in range(STEPS)]
    return [(i[:, :-1], i[:, 1:]) for i in ids]


def solo(base: GPT, job: JobSpec, data) -> tuple[list[float], dict[str, torch.Tensor], GPT]:
    """The job alone, as ``loralab.run`` trains it: seeded injection, AdamW, warm-up + cosine,
    norm clipping."""
    model = copy.deepcopy(base)
    torch.manual_seed(job.seed)
    inject_lora(model, job.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.lr, betas=job.betas, weight_decay=job.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(job.warmup_steps, job.max_steps, job.min_lr_ratio))
    losses = []
    for x, y in data:
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        if job.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(params, job.gradient_clip_val)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, lora_state_dict(model), model


def packed(base: GPT, jobs: dict[str, JobSpec]) -> tuple[Pack, dict[str, list[float]]]:
    pack = Pack(copy.deepcopy(base), jobs)
    data = {name: batches(job.seed) for name, job in jobs.items()}
    losses = {name: [] for name in jobs}
    for step in range(STEPS):
        for name, loss in pack.train_step({name: data[name][step] for name in jobs}).items():
            losses[name].append(loss)
    return pack, losses


@pytest.fixture(scope="module")
def base() -> GPT:
    return tiny_base()


@pytest.fixture(scope="module")
def alone(base) -> dict[str, tuple]:
    """Each job trained alone: (losses, adapter, model)."""
    return {name: solo(base, job, batches(job.seed)) for name, job in JOBS.items()}


@pytest.fixture(scope="module")
def trained(base) -> tuple[Pack, dict[str, list[float]]]:
    return packed(base, JOBS)


def test_each_packed_job_trains_as_it_does_alone(alone, trained):
    pack, losses = trained
    for name in JOBS:
        solo_losses, solo_adapter, _ = alone[name]
        assert losses[name] == pytest.approx(solo_losses, rel=1e-5, abs=1e-6), name
        state = pack.adapter_state(name)
        assert state.keys() == solo_adapter.keys(), name  # the same layers adapted, under the same keys
        for key, value in solo_adapter.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_packed_evaluation_is_each_job_alone(alone, trained):
    pack, _ = trained
    val = batches(9)[:2]
    metrics = pack.evaluate(list(JOBS), val)
    for name in JOBS:
        model = alone[name][2]
        model.eval()
        with torch.no_grad():
            logits = [model(x)[0] for x, _ in val]
        flat = torch.cat([lg.reshape(-1, 64) for lg in logits])
        target = torch.cat([y.reshape(-1) for _, y in val])
        loss = F.cross_entropy(flat, target).item()
        assert metrics[name]["val/loss"] == pytest.approx(loss, rel=1e-5), name
        assert metrics[name]["val/acc"] == pytest.approx((flat.argmax(-1) == target).float().mean().item()), name


def test_packed_reruns_are_bit_identical(base, trained):
    first, second = trained[0], packed(base, JOBS)[0]
    for name in JOBS:
        for key, value in first.adapter_state(name).items():
            assert torch.equal(value, second.adapter_state(name)[key]), f"{name} {key}"


def test_a_diverged_job_leaves_the_others_as_they_were(base):
    pack = Pack(copy.deepcopy(base), JOBS)
    with torch.no_grad():  # job r2s2's adapter overflows: its loss is NaN from the first step
        next(iter(pack.layers.values())).adapters["r2s2"].lora_B.fill_(float("inf"))
    data = {name: batches(job.seed) for name, job in JOBS.items()}
    losses = pack.train_step({name: data[name][0] for name in JOBS})
    assert not torch.isfinite(torch.tensor(losses["r2s2"]))
    for name in ("r2s1", "r4s1", "r4s2"):
        solo_losses, solo_adapter, _ = solo(base, JOBS[name], data[name][:1])
        assert losses[name] == pytest.approx(solo_losses[0], rel=1e-5), name
        for key, value in solo_adapter.items():
            torch.testing.assert_close(pack.adapter_state(name)[key], value, rtol=1e-4, atol=1e-5)


def test_a_job_state_restores_training_exactly(base):
    jobs = {"a": JOBS["r4s1"]}
    data = batches(1)
    whole = Pack(copy.deepcopy(base), jobs)
    for x, y in data:
        whole.train_step({"a": (x, y)})
    first = Pack(copy.deepcopy(base), jobs)
    for x, y in data[:3]:
        first.train_step({"a": (x, y)})
    state = first.job_state("a")
    resumed = Pack(copy.deepcopy(base), jobs)
    resumed.load_job_state("a", state)
    for x, y in data[3:]:
        resumed.train_step({"a": (x, y)})
    for key, value in whole.adapter_state("a").items():
        assert torch.equal(resumed.adapter_state("a")[key], value), key


def test_what_is_not_packed_is_named():
    assert unpackable(LoRAConfig(rank=4, dropout=0.1, target_modules="all-linear")) is None
    assert unpackable(LoRAConfig(quantize="nf4")) == "lora.quantize='nf4' is not packed"
    with pytest.raises(ValueError, match="job 'q' cannot be packed: lora.modules_to_save"):
        Pack(tiny_base(), {"q": JobSpec(LoRAConfig(modules_to_save=["lm_head"]), seed=0, lr=1e-3, max_steps=1)})

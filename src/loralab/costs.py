"""What each way of fine-tuning costs on this hardware, measured: training step time, peak
memory (in a fresh process per mode), forward pass unmerged and merged, generation with
and without the KV cache, checkpoint bytes. ``loralab.savings`` is its command line and
report; this module is where torch comes in, imported only once the arguments parsed.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loralab.adapters import save_adapter
from loralab.lora import LoRAConfig, inject_lora, merge_lora, unmerge_lora
from loralab.memory import current_memory_mb, peak_memory_mb, reset_peak_memory
from loralab.model import GPT, GPTConfig
from loralab.quant import quantized_layers

MODEL_PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"
TARGETS = ["q_proj", "v_proj"]
MODES = ("full", "lora", "qlora_int8", "qlora_nf4", "dora", "pissa", "peft_lora", "peft_dora", "peft_pissa")
VARIANTS = {"lora": {}, "dora": {"dora": True}, "pissa": {"init": "pissa"}}  # as LoRAConfig overrides
PEFT_VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}


def model_config(name: str) -> GPTConfig:
    """The shape of ``conf/model/<name>.yaml``."""
    from omegaconf import OmegaConf

    path = MODEL_PRESETS / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in MODEL_PRESETS.glob("*.yaml"))
        raise SystemExit(f"error: --model {name!r} is not a preset: expected one of {presets} (in {MODEL_PRESETS})")
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("pretrained", None)
    return GPTConfig(**values)


def text_tokens(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(batch, length) byte tokens of real text (Python's reference documentation)."""
    from pydoc_data.topics import topics

    data = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[:batch * length]
    return torch.tensor(list(data), dtype=torch.long, device=device).view(batch, length)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_times(runs: dict, spec: dict, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each run, ``{name: (prepare or None, run)}``, once per round; each round starts
    with a different run, and the first ``warmup`` rounds are not kept."""
    times = {name: [] for name in runs}
    for i in range(spec["warmup"] + spec["steps"]):
        names = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]
        for name in names:
            prepare, run = runs[name]
            if prepare is not None:
                prepare()
            seconds = timed(run, device)
            if i >= spec["warmup"]:
                times[name].append(seconds)
    return times


# ---------------------------------------------------------------------------
# Peak memory


def set_mmap_threshold(nbytes: int) -> None:
    """glibc: serve allocations of ``nbytes`` and more by mmap (M_MMAP_THRESHOLD), not the heap."""
    ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)


# ---------------------------------------------------------------------------
# Training: step times side by side here, peak memory in a fresh process per mode


def build(mode: str, config: GPTConfig, rank: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if mode.startswith("peft_"):
        import peft  # imported before the memory baseline by measure_memory

        variant = PEFT_VARIANTS[mode.removeprefix("peft_")]
        return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                          **variant))
    if mode.startswith("qlora_"):
        inject_lora(model, LoRAConfig(rank=rank, alpha=2 * rank, target_modules=TARGETS,
                                      quantize=mode.removeprefix("qlora_")))
    elif mode != "full":
        inject_lora(model, LoRAConfig(rank=rank, alpha=2 * rank, target_modules=TARGETS, **VARIANTS[mode]))
    return model


def training_step(model: torch.nn.Module, spec: dict, device: torch.device):
    """One AdamW step on a batch of real text, as a function of nothing."""
    x = text_tokens(spec["batch"], spec["seq"] + 1, device)
    inputs, targets = x[:, :-1], x[:, 1:]  # (B, T)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(inputs, targets)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_steps(modes: list[str], config: GPTConfig, spec: dict, device: torch.device) -> dict:
    runs = {mode: (None, training_step(build(mode, config, spec["rank"], device), spec, device)) for mode in modes}
    times = interleaved_times(runs, spec, device)
    return {mode: {"step_s": statistics.median(t), "step_s_all": t} for mode, t in times.items()}


def measure_memory(mode: str, spec: dict) -> dict:
    """Peak memory of one mode's first two steps, in this (fresh) process; its trainable
    parameters, and the bytes of its quantized weights."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cpu":
        set_mmap_threshold(2**20)  # freed tensors leave the resident set
    if mode.startswith("peft_"):
        import peft  # noqa: F401  (its import is not the adapter's memory)
    tiny = GPT(GPTConfig(vocab_size=256, block_size=spec["seq"], n_layer=1, n_head=1, n_embd=8)).to(device)
    training_step(tiny, spec, device)()  # torch loads code on first use (autograd, AdamW): no mode's cost
    del tiny
    baseline = current_memory_mb(device)
    model = build(mode, GPTConfig(**spec["config"]), spec["rank"], device)
    step = training_step(model, spec, device)
    reset_peak_memory(device)
    for _ in range(2):  # the first allocates AdamW's state, the second runs as every later one
        step()
    result = {"peak_mem_mb": peak_memory_mb(device) - baseline,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    layers = quantized_layers(model).values()
    if layers:
        result["quantized_weight_bytes"] = sum(m.weight_bytes() for m in layers)
        result["fp32_weight_bytes"] = sum(4 * m.in_features * m.out_features for m in layers)
    return result


def memory_in_fresh_process(mode: str, spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "loralab.savings", "--child", mode, "--spec", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring the memory of mode {mode!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Inference and checkpoints, in this process


@torch.no_grad()
def measure_forward(base: GPT, spec: dict, device: torch.device) -> dict:
    """Median forward time of the base, LoRA unmerged and LoRA merged, interleaved."""
    lora = build("lora", base.config, spec["rank"], device).eval()
    for layer in lora.modules():  # a trained adapter, not B = 0
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = text_tokens(spec["batch"], spec["seq"], device)
    times = interleaved_times({"base_s": (None, lambda: base(x)),
                               "lora_unmerged_s": (lambda: unmerge_lora(lora), lambda: lora(x)),
                               "lora_merged_s": (lambda: merge_lora(lora), lambda: lora(x))}, spec, device)
    return {key: statistics.median(values) for key, values in times.items()} | {"all": times}


def measure_generation(base: GPT, spec: dict, device: torch.device) -> dict:
    """Greedy tokens/s for ``new_tokens`` new tokens after a ``prompt``-token prompt, batch 1."""
    prompt = text_tokens(1, spec["prompt"], device)
    result = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        base.generate(prompt, 4, temperature=0, use_cache=use_cache)  # warm-up
        seconds = timed(lambda use_cache=use_cache: base.generate(prompt, spec["new_tokens"], temperature=0,
                                                                  use_cache=use_cache), device)
        result[f"{name}_tokens_per_s"] = spec["new_tokens"] / seconds
    return result


def measure_checkpoints(base: GPT, spec: dict, device: torch.device) -> dict:
    """Bytes on disk: the whole model (safetensors, tied weights once) and the adapter alone."""
    from safetensors.torch import save_model

    lora = build("lora", base.config, spec["rank"], device)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(base, f"{tmp}/model.safetensors")
        save_adapter(lora, LoRAConfig(rank=spec["rank"], alpha=2 * spec["rank"], target_modules=TARGETS), tmp)
        return {"full_bytes": Path(f"{tmp}/model.safetensors").stat().st_size,
                "adapter_bytes": Path(f"{tmp}/adapter.safetensors").stat().st_size}


# ---------------------------------------------------------------------------
# All of it


def measure(args) -> dict:
    """Every measurement for the parsed arguments of ``loralab.savings``: {"spec", "train",
    "forward", "generate", "checkpoint", "provenance"}."""
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    config = model_config(args.model)
    if args.seq > config.block_size or args.prompt + args.new_tokens > config.block_size:
        raise SystemExit(f"error: --seq={args.seq} and --prompt + --new-tokens={args.prompt + args.new_tokens} "
                         f"must fit the {args.model} block_size={config.block_size} (so every step uses the cache)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = {"model": args.model, "config": vars(config), "device": str(device), "batch": args.batch,
            "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "rank": args.rank, "threads": threads,
            "new_tokens": args.new_tokens, "prompt": args.prompt, "targets": TARGETS}
    modes = [m for m in MODES if not m.startswith("peft_") or _peft_installed()]
    memory = {mode: memory_in_fresh_process(mode, spec) for mode in modes}
    steps = measure_steps(modes, config, spec, device)
    results = {"spec": spec, "train": {mode: memory[mode] | steps[mode] for mode in modes}}
    torch.manual_seed(0)
    base = GPT(config).to(device).eval()
    spec["params"] = sum(p.numel() for p in base.parameters())
    return results | {"forward": measure_forward(base, spec, device),
                      "generate": measure_generation(base, spec, device),
                      "checkpoint": measure_checkpoints(base, spec, device),
                      "provenance": {"torch": torch.__version__, "python": sys.version.split()[0]}}


def _peft_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None

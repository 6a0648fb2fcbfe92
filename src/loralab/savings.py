"""What LoRA and QLoRA save on your hardware, measured side by side in one run.

    python -m loralab.savings                                  # GPT-2 124M shape, batch 1 × 128 tokens
    python -m loralab.savings --model tiny --new-tokens 32     # the 2-layer shape: a quick check
    python -m loralab.savings --batch 4 --seq 256 --threads 1 --out savings.json

(Linux or CUDA; ``--threads 1`` keeps CPU timings steady on a machine shared with others.)

On one model shape (a ``conf/model`` preset; CUDA when present) it measures, after
warm-up, the median over steps of:

- the training step (forward, backward, AdamW step) of full fine-tuning, LoRA,
  QLoRA int8, QLoRA nf4, DoRA, PiSSA and PEFT's LoRA, DoRA and PiSSA (when ``peft``
  is installed), all in this
  process, one step of each mode per round, rounds rotating which mode goes
  first, so that a busy moment of a shared machine hits every mode alike;
- the peak memory of each mode, in a fresh process per mode: what the mode adds
  above the bare process (Python + torch) over its first two steps (the first
  allocates AdamW's state). On CUDA the allocator's peak; on the CPU the
  resident-set high-water mark (Linux ``VmHWM``), reset once the model is built,
  so that the float base that QLoRA quantizes while loading is not counted.
  glibc keeps freed memory in its heap, where QLoRA's transient dequantized
  weights fragment it, so there tensors of 1 MiB and more are mmap-ed (returned
  to the OS when freed);
- the forward pass of the base, LoRA unmerged and LoRA merged (interleaved alike);
- greedy generation of ``--new-tokens`` tokens with and without the KV cache;
- checkpoint bytes: the full model against the adapter alone,

then prints the raw numbers and their ratios and writes both as JSON (``--out``).
LoRA everywhere is rank ``--rank`` on ``q_proj, v_proj`` (the default config).
"""

from __future__ import annotations

import argparse
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
# (ratio, numerator, denominator, target: the ratio must be at most this, or None)
RATIOS = [
    ("lora_vs_full_step", "train.lora.step_s", "train.full.step_s", None),
    ("ours_vs_peft_step", "train.lora.step_s", "train.peft_lora.step_s", 1.0),
    ("lora_vs_full_peak_mem", "train.lora.peak_mem_mb", "train.full.peak_mem_mb", None),
    ("qlora_int8_vs_lora_peak_mem", "train.qlora_int8.peak_mem_mb", "train.lora.peak_mem_mb", None),
    ("qlora_nf4_vs_lora_peak_mem", "train.qlora_nf4.peak_mem_mb", "train.lora.peak_mem_mb", None),
    ("qlora_nf4_vs_lora_step", "train.qlora_nf4.step_s", "train.lora.step_s", None),
    ("dora_vs_lora_step", "train.dora.step_s", "train.lora.step_s", None),
    ("ours_vs_peft_dora_step", "train.dora.step_s", "train.peft_dora.step_s", None),
    ("dora_vs_lora_peak_mem", "train.dora.peak_mem_mb", "train.lora.peak_mem_mb", None),
    ("ours_vs_peft_dora_peak_mem", "train.dora.peak_mem_mb", "train.peft_dora.peak_mem_mb", None),
    ("pissa_vs_lora_step", "train.pissa.step_s", "train.lora.step_s", None),
    ("ours_vs_peft_pissa_step", "train.pissa.step_s", "train.peft_pissa.step_s", None),
    ("pissa_vs_lora_peak_mem", "train.pissa.peak_mem_mb", "train.lora.peak_mem_mb", None),
    ("unmerged_vs_base_forward", "forward.lora_unmerged_s", "forward.base_s", None),
    ("merged_vs_base_forward", "forward.lora_merged_s", "forward.base_s", 1.02),
    ("kv_cache_speedup", "generate.cached_tokens_per_s", "generate.uncached_tokens_per_s", None),
    ("adapter_vs_full_bytes", "checkpoint.adapter_bytes", "checkpoint.full_bytes", None),
    ("nf4_vs_fp32_weight_bytes", "train.qlora_nf4.quantized_weight_bytes", "train.qlora_nf4.fp32_weight_bytes", 0.3),
]


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
# The report


def lookup(results: dict, dotted: str):
    node = results
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def ratios(results: dict) -> dict:
    out = {}
    for name, numerator, denominator, _ in RATIOS:
        a, b = lookup(results, numerator), lookup(results, denominator)
        out[name] = a / b if a is not None and b else None
    return out


def print_report(results: dict) -> None:
    spec = results["spec"]
    print(f"loralab savings: {spec['model']} shape ({spec['params']:,} parameters), batch {spec['batch']} × "
          f"{spec['seq']} tokens, LoRA r={spec['rank']} on {'+'.join(TARGETS)}, {spec['device']} "
          f"({spec['threads']} threads); "
          f"medians of {spec['steps']} steps after {spec['warmup']} warm-up")
    print(f"\n{'mode':<12} {'step s':>8} {'peak MiB':>9} {'trainable':>12}")
    for mode, r in results["train"].items():
        print(f"{mode:<12} {r['step_s']:8.3f} {r['peak_mem_mb']:9.1f} {r['trainable']:12,}")
    fwd, gen, ckpt = results["forward"], results["generate"], results["checkpoint"]
    print(f"\nforward s: base {fwd['base_s']:.4f}, LoRA unmerged {fwd['lora_unmerged_s']:.4f}, "
          f"LoRA merged {fwd['lora_merged_s']:.4f}")
    print(f"generate {spec['new_tokens']} tokens: {gen['cached_tokens_per_s']:.1f} tok/s with KV cache, "
          f"{gen['uncached_tokens_per_s']:.1f} without")
    print(f"checkpoint bytes: full {ckpt['full_bytes']:,}, adapter {ckpt['adapter_bytes']:,}")
    print(f"\n{'ratio':<28} {'value':>8} {'target':>8}")
    for name, _, _, target in RATIOS:
        value = results["ratios"][name]
        shown = "n/a" if value is None else f"{value:.4f}"
        verdict = "" if target is None or value is None else ("met" if value <= target else "MISSED")
        print(f"{name:<28} {shown:>8} {'' if target is None else f'<= {target}':>8} {verdict}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loralab.savings", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="a conf/model preset: the shape to measure (default gpt2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens before generating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "steps", "rank", "new_tokens", "prompt", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected a positive integer")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is invalid: expected an integer >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:  # one training mode's memory, in its own process: its result is the last line
        spec = json.loads(args.spec)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure_memory(args.child, spec)))
        return
    torch.set_num_threads(args.threads)
    config = model_config(args.model)
    if args.seq > config.block_size or args.prompt + args.new_tokens > config.block_size:
        raise SystemExit(f"error: --seq={args.seq} and --prompt + --new-tokens={args.prompt + args.new_tokens} "
                         f"must fit the {args.model} block_size={config.block_size} (so every step uses the cache)")
    device = torch.device(args.device)
    spec = {"model": args.model, "config": vars(config), "device": str(device), "batch": args.batch,
            "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "rank": args.rank, "threads": args.threads,
            "new_tokens": args.new_tokens, "prompt": args.prompt}
    modes = [m for m in MODES if not m.startswith("peft_") or _peft_installed()]
    memory = {mode: memory_in_fresh_process(mode, spec) for mode in modes}
    steps = measure_steps(modes, config, spec, device)
    results = {"spec": spec, "train": {mode: memory[mode] | steps[mode] for mode in modes}}
    torch.manual_seed(0)
    base = GPT(config).to(device).eval()
    spec["params"] = sum(p.numel() for p in base.parameters())
    results |= {"forward": measure_forward(base, spec, device), "generate": measure_generation(base, spec, device),
                "checkpoint": measure_checkpoints(base, spec, device),
                "provenance": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    results["ratios"] = ratios(results)
    print_report(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        print(f"\nwrote {args.out}")


def _peft_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


if __name__ == "__main__":
    main()

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
import json
from pathlib import Path

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
          f"{spec['seq']} tokens, LoRA r={spec['rank']} on {'+'.join(spec['targets'])}, {spec['device']} "
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
    parser = argparse.ArgumentParser(prog="loralab-savings", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="a conf/model preset: the shape to measure (default gpt2)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per training step (default 1)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on q and v (default 8)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens before generating")
    parser.add_argument("--device", help="where to measure (default: cuda when present, else cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a mode of loralab.costs.MODES
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "steps", "rank", "new_tokens", "prompt", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected a positive integer")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is invalid: expected an integer >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from loralab import costs  # torch, once the arguments are known: --help and bad input answer at once

    if args.child:  # one training mode's memory, in its own process: its result is the last line
        print(json.dumps(costs.measure_memory(args.child, json.loads(args.spec))))
        return
    results = costs.measure(args)
    results["ratios"] = ratios(results)
    print_report(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Evaluate every adapter of a sweep on equal terms, after the fact: one base, many adapters.

    python -m loralab.evaluate SWEEP_DIR                           # the sweep's own held-out split
    python -m loralab.evaluate SWEEP_DIR --prompt "def main("      # and greedy generations side by side
    python -m loralab.evaluate SWEEP_DIR data=text data.train_path=new.txt   # on new data

Loads the base the sweep's adapters were trained on once (the base each adapter
records; all must agree), adds every completed adapter to it by name, and evaluates
the base alone (adapters disabled) and each adapter in turn on the same whole
held-out split. Writes ``evaluation.md`` and ``evaluation.csv`` into the sweep
directory and prints the table; every job it leaves out (no adapter, an adapter that cannot
be read, a summary that cannot be read, not completed) is listed, with why, in
``evaluation.md`` and on stderr. Errors are one line, exit 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from loralab.exits import one_line
from loralab.files import write_atomic
from loralab.layout import (
    SUMMARY,
    adapter_dir,
    completed_adapter_jobs,
    hydra_config,
    left_out,
    no_adapter,
    read_adapter_config,
)

if TYPE_CHECKING:
    from loralab.model import GPT

BASE = "base (no adapter)"


def completed_jobs(sweep_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(run name, job directory) of every job that left a completed LoRA adapter whose config
    reads, in job order; and why each other job is left out."""
    from loralab.adapters import AdapterFileError  # here: importing it imports torch

    completed, notes = completed_adapter_jobs(sweep_dir)
    jobs = []
    for job_dir, summary in completed:
        try:
            read_adapter_config(job_dir)
        except AdapterFileError as e:
            notes.append(left_out(job_dir, f"its adapter cannot be read ({e})"))
            continue
        jobs.append((summary.get("name") or job_dir.name, job_dir))
    if not jobs:
        raise FileNotFoundError(no_adapter(sweep_dir, notes))
    return jobs, notes


def require_shareable(jobs: list[tuple[str, Path]], cfg) -> None:
    """Adapters side by side on one base must each be low-rank weights alone, on a GPT."""
    kind = cfg.model.get("kind", "gpt")
    if kind != "gpt":
        raise ValueError(f"the sweep's runs are model.kind={kind}: loralab.evaluate compares GPT adapters only "
                         f"(each run's {SUMMARY} holds its final val/ metrics on the whole held-out split)")
    for name, job_dir in jobs:
        saved = read_adapter_config(job_dir)["lora"].get("modules_to_save")
        if saved:
            raise ValueError(f"run {name!r} trained modules_to_save={saved} in full beside its adapter: adapters "
                             f"that share one base cannot each bring their own copy of those modules, so "
                             f"loralab.evaluate cannot compare them (each run's {SUMMARY} holds its final "
                             f"val/ metrics)")


def shared_base(jobs: list[tuple[str, Path]]) -> tuple[GPT, str]:
    """The one base every adapter of the sweep records, loaded and verified, and its hash."""
    from loralab.base import BaseError, load_recorded_base

    bases = {json.dumps(read_adapter_config(d).get("base"), sort_keys=True) for _, d in jobs}
    if len(bases) != 1 or "null" in bases:
        raise BaseError("the sweep's adapters do not record one common base: evaluate them sweep by sweep")
    base = json.loads(bases.pop())
    return load_recorded_base(base), base["sha256"]


def held_out_loss(model: GPT, batches) -> float:
    """Mean next-token cross-entropy over every token of ``batches`` (as the runs' val/loss)."""
    model.eval()
    total, tokens = 0.0, 0
    for x, y in batches:
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        tokens += y.numel()
    return total / tokens


def greedy(model: GPT, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    out = model.eval().generate(idx, max_new_tokens, temperature=0)
    return tokenizer.decode(out[0, idx.size(1):].tolist())


def evaluate_sweep(sweep_dir: Path, overrides: list[str], prompt: str | None,
                   max_new_tokens: int) -> tuple[list[dict], list[str]]:
    """A row for the base and for each adapter; and why each job left out is left out."""
    import torch

    from loralab.adapters import AdapterFileError, disable_adapter, load_adapter_files, set_adapter
    from loralab.data import TextDataModule, tokenizer_of

    completed, notes = completed_jobs(sweep_dir)
    cfg = OmegaConf.merge(hydra_config(completed[0][1]), OmegaConf.from_dotlist(overrides))
    require_shareable(completed, cfg)
    model, sha256 = shared_base(completed)
    jobs = []
    for name, job_dir in completed:
        try:
            load_adapter_files(model, adapter_dir(job_dir), name=f"job{len(jobs)}", expected_base_sha256=sha256)
        except AdapterFileError as e:  # a truncated or damaged adapter: the others are still compared
            notes.append(left_out(job_dir, f"its adapter cannot be read ({e})"))
            continue
        jobs.append((name, job_dir))
    if not jobs:
        raise FileNotFoundError(no_adapter(sweep_dir, notes))
    tok = tokenizer_of(cfg.model.pretrained)
    data = TextDataModule(block_size=model.config.block_size, tokenizer=tok, seed=cfg.seed, **cfg.data)
    batches = list(data.val_dataloader())
    rows = []
    for i, (name, job_dir) in enumerate([(BASE, None), *jobs]):
        if job_dir is not None:
            set_adapter(model, f"job{i - 1}")
        with torch.no_grad(), disable_adapter(model) if job_dir is None else nullcontext():
            loss = held_out_loss(model, batches)
            row = {"run": name, "job": job_dir.name if job_dir else "", "val/loss": loss, "val/ppl": math.exp(loss),
                   "val/tokens": sum(y.numel() for _, y in batches)}
            if prompt is not None:
                row["generation"] = greedy(model, tok, prompt, max_new_tokens)
        rows.append(row)
    return rows, notes


def to_markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v).replace("\n", "\\n") for v in row.values()]
        lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loralab-evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("overrides", nargs="*", help="data overrides, e.g. data=text data.train_path=new.txt")
    parser.add_argument("--prompt", help="also generate greedily from this prompt with every adapter")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens each generation adds (default 64)")
    args = parser.parse_args(argv)
    # `data=text` picks the group in train.py; on a saved config it is data.corpus=text
    overrides = ["data.corpus=text" if o == "data=text" else o for o in args.overrides]
    from loralab.base import BaseError  # torch: only once the arguments are known

    try:
        rows, notes = evaluate_sweep(args.sweep_dir, overrides, args.prompt, args.max_new_tokens)
    except (FileNotFoundError, BaseError, ValueError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    table = to_markdown(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(args.sweep_dir / "evaluation.csv", out.getvalue().encode())
    parts = [f"# Evaluation: {args.sweep_dir}", table, *notes]
    write_atomic(args.sweep_dir / "evaluation.md", ("\n\n".join(parts) + "\n").encode())
    for note in notes:
        print(note, file=sys.stderr)
    print(table)


if __name__ == "__main__":
    main()

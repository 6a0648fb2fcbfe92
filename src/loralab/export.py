"""Export a finished LoRA run for Hugging Face: a PEFT adapter, or a merged GPT-2 checkpoint.

    python -m loralab.export RUN_DIR --peft OUT_DIR     # adapter_config.json + adapter_model.safetensors
    python -m loralab.export RUN_DIR --merged OUT_DIR   # config.json + model.safetensors (plain GPT-2),
                                                        # and the base's tokenizer files when it has them

The adapter goes onto exactly the base its run recorded (path and weights' SHA-256 in
``adapter/adapter_config.json``), quantized as its run quantized it (``lora.quantize``).
Export never trains: a missing or different base is one error line saying which base it
needs and how to get it back. A QLoRA run (``lora.quantize=int8|nf4``) exports only
``--merged``, which dequantizes its base explicitly (``dequantize=True``): float32
weights holding what the QLoRA model computes. ``--peft`` refuses it, since on the float
GPT-2 its adapter would compute something else.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.layout import ADAPTER_DIR, adapter_dir, has_adapter, hydra_overrides, in_run_files, read_adapter_config

if TYPE_CHECKING:
    from loralab.lora import LoRAConfig
    from loralab.model import GPT


def load_finetuned(run_dir: str | Path) -> tuple[GPT, LoRAConfig, dict]:
    """The fine-tuned model of a completed LoRA run (its recorded base with its adapter
    loaded), the adapter's LoRAConfig and the adapter's saved metadata."""
    from loralab.adapters import ADAPTER_CONFIG, AdapterFileError, load_adapter_files, non_finite_weights
    from loralab.base import BaseError, load_recorded_base

    run_dir = Path(run_dir)
    if not has_adapter(run_dir):
        raise FileNotFoundError(f"{str(run_dir)!r} is not a completed LoRA run: it has no "
                                f"{ADAPTER_DIR}/{ADAPTER_CONFIG}")
    meta = read_adapter_config(run_dir)
    if "base" not in meta:
        raise BaseError(f"{adapter_dir(run_dir) / ADAPTER_CONFIG} does not record its base model "
                        "(written by an older loralab): re-run the run to export it")
    try:
        model = load_recorded_base(meta["base"])
    except BaseError as e:
        raise BaseError(f"{e}. {how_to_rebuild(run_dir, meta['base'])}") from None
    config = load_adapter_files(model, adapter_dir(run_dir))
    non_finite = non_finite_weights(model)
    if non_finite:
        raise AdapterFileError(f"{adapter_dir(run_dir)} holds NaN or inf weights ({non_finite[0]} and "
                               f"{len(non_finite) - 1} more): a diverged run has nothing to export")
    return model, config, meta


def how_to_rebuild(run_dir: Path, base: dict) -> str:
    if base["source"] != "cache":
        return "Put that file back where it was (the run loaded it from there)."
    command = shlex.join(["python", "train.py", *(hydra_overrides(run_dir) or [])])
    return (f"Pretraining is deterministic: running `{command}` from the directory that holds "
            f"{shlex.quote(str(Path(base['path']).parent))} pretrains the same base again")


# what a Hugging Face directory reads text with (AutoTokenizer finds any of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def copy_tokenizer(base: dict, out: Path) -> None:
    """The tokenizer files of a Hugging Face base beside the merged weights, so the export reads
    text as its base did (without them AutoTokenizer finds nothing to load)."""
    if base["source"] != "gpt2":
        return
    for name in TOKENIZER_FILES:
        if (Path(base["path"]) / name).is_file():
            shutil.copyfile(Path(base["path"]) / name, Path(out) / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loralab-export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory written by train.py")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--peft", metavar="OUT_DIR", help="write a PEFT adapter for Hugging Face's GPT-2")
    target.add_argument("--merged", metavar="OUT_DIR", help="write a merged GPT-2 checkpoint for transformers")
    args = parser.parse_args(argv)
    out_dir = args.peft or args.merged
    if in_run_files(out_dir, args.run_dir):  # PEFT's adapter_config.json would replace the run's own
        print(f"error: {out_dir} is inside the run's own files: export into another directory "
              f"(e.g. {Path(args.run_dir) / 'peft'})", file=sys.stderr)
        sys.exit(2)
    # torch: only once the arguments are known, so that --help and bad arguments answer at once
    from loralab.adapters import AdapterFileError
    from loralab.base import BaseError
    from loralab.gpt2 import save_merged_gpt2
    from loralab.peft_adapter import export_peft_adapter

    try:
        model, config, meta = load_finetuned(args.run_dir)
    except (FileNotFoundError, BaseError, AdapterFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # the run's files are not what export needs: nothing was written
    try:
        if args.peft:
            base_path = meta["base"]["path"] if meta["base"]["source"] == "gpt2" else None
            out = export_peft_adapter(model, config, args.peft, base_model_name_or_path=base_path)
        else:
            out = save_merged_gpt2(model, args.merged, dequantize=True)  # a QLoRA base: float32 weights
            copy_tokenizer(meta["base"], out)
    except ValueError as e:  # the run cannot be exported this way (a QLoRA run as PEFT): nothing was written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Export a finished LoRA run for Hugging Face: a PEFT adapter, or a merged GPT-2 checkpoint.

    python -m loralab.export RUN_DIR --peft OUT_DIR     # adapter_config.json + adapter_model.safetensors
    python -m loralab.export RUN_DIR --merged OUT_DIR   # config.json + model.safetensors (plain GPT-2)

The run's base is rebuilt from its saved config (the GPT-2 directory it loaded, its
base checkpoint, or the cached pretraining) and its adapter loaded on top.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from loralab.lora import LoRAConfig, load_adapter
from loralab.model import GPT


def load_run(run_dir: str | Path) -> tuple[GPT, LoRAConfig, DictConfig]:
    """The fine-tuned model of a completed LoRA run (its base with its adapter loaded),
    the adapter's LoRAConfig and the run's config."""
    from loralab.loggers import RunIdentity
    from loralab.run import base_model

    run_dir = Path(run_dir)
    config_file, adapter = run_dir / ".hydra" / "config.yaml", run_dir / "adapter"
    if not config_file.is_file() or not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a completed LoRA run: it needs .hydra/config.yaml "
                                f"and adapter/adapter_config.json")
    cfg = OmegaConf.load(config_file)
    cfg.paths.output_dir = str(run_dir)  # was ${hydra:runtime.output_dir}, unset outside Hydra
    model = base_model(cfg, RunIdentity(name=run_dir.name, group=None, overrides=[]))
    return model, load_adapter(model, adapter), cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loralab.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory written by train.py")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--peft", metavar="OUT_DIR", help="write a PEFT adapter for Hugging Face's GPT-2")
    target.add_argument("--merged", metavar="OUT_DIR", help="write a merged GPT-2 checkpoint for transformers")
    args = parser.parse_args(argv)
    from loralab.hf import export_peft_adapter, save_merged_gpt2

    try:
        model, config, cfg = load_run(args.run_dir)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if args.peft:
        out = export_peft_adapter(model, config, args.peft, base_model_name_or_path=cfg.model.pretrained)
    else:
        out = save_merged_gpt2(model, args.merged)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

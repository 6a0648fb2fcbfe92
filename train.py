"""Fine-tune a GPT with LoRA as the Hydra config in conf/ says.

    python train.py                          # the default experiment
    python train.py -m lora.rank=4,8,16      # a sweep: one run per rank

Exit codes: 0 completed, 1 failed, 2 invalid config, 3 diverged, 4 interrupted (loralab.exits).
"""

import sys

import hydra
from omegaconf import DictConfig

from loralab.exits import run
from loralab.plugins import require_plugins


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from loralab.run import train  # imported here so --help and config errors stay fast

    return train(cfg)


def print_help() -> None:
    """--help as conf/hydra/help/loralab.yaml words it. Rendered here, not by Hydra, whose help
    also lists every option of every config group, one deep copy of the config repository each
    (seconds), for a text that names its groups itself; loralab.schema (torch) is not needed."""
    from pathlib import Path

    from omegaconf import OmegaConf

    words = OmegaConf.load(Path(__file__).parent / "conf" / "hydra" / "help" / "loralab.yaml")
    print(OmegaConf.create({"hydra": {"help": words}}).hydra.help.template)


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        sys.exit(print_help())
    require_plugins(sys.argv[1:])  # one line naming the extra, before Hydra's "Could not find ..."
    import loralab.schema  # noqa: F401  registers the config schema (train_schema) before Hydra composes
    run(main)

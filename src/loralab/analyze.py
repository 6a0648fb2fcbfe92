"""The adapters of a sweep, analysed as in the LoRA paper's §7: analysis.md and heat maps.

    python -m loralab.analyze outputs/multirun/2024-05-01/12-00-00     (or: loralab-analyze DIR)

Effective and stable rank, ‖ΔW‖_F, amplification and top-r energy share per run and per
setting, and the subspace similarity of the adapters between ranks and between seeds
(Hu et al. 2021, §7), written into the sweep directory (``loralab.sweep_analysis``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loralab-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--base", type=Path, help="the base model's .safetensors, for the numbers that compare "
                                                   "ΔW with W (default: the file adapter_config.json names)")
    parser.add_argument("--layers", help="a regular expression: the adapted layers the heat maps draw (default: all)")
    args = parser.parse_args(argv)
    from loralab.sweep_analysis import AnalysisError, write_analysis  # torch: only once the arguments are known

    try:
        if not args.sweep_dir.is_dir():
            raise AnalysisError(f"{args.sweep_dir} is not a directory")
        path = write_analysis(args.sweep_dir, args.base, args.layers)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for line in path.read_text().splitlines():  # every job left out, and why
        if line.startswith("Job ") and " left out: " in line:
            print(line, file=sys.stderr)
    print(f"Adapter analysis: {path}", flush=True)


if __name__ == "__main__":
    main()

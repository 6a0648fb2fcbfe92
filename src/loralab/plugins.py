"""The optional Hydra plugins behind launchers and searches, and the extra that installs each.

Without the plugin, Hydra reports ``Could not find 'hydra/launcher/ray'`` and lists the
options it has; ``require_plugins`` says instead, in one line, what to install.
"""

from __future__ import annotations

import importlib.util

# command-line choice -> (the plugin's module, its package on PyPI, the pyproject extra)
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "joblib"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "hydra/launcher=ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher", "ray"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "optuna"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "optuna"),
}


def require_plugins(argv: list[str]) -> None:
    """Exit with one line if a choice on the command line needs a plugin that is not installed."""
    for arg in argv:
        module, package, extra = PLUGINS.get(arg.removeprefix("override "), (None, None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise SystemExit(f"{arg} needs the {package} package: pip install -e \".[{extra}]\" "
                             f"(or pip install {package})")

"""Every named experiment in conf/experiment/ composes for each of its sweep points, passes
validation at its real size, and runs for a couple of steps."""

import itertools

import pytest
from conftest import ROOT, TINY, compose
from hydra.core.override_parser.overrides_parser import OverridesParser

from loralab.config import validate

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def sweep_points(experiment: str) -> list[list[str]]:
    """The jobs ``python train.py -m experiment=NAME`` launches, as lists of overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    parser = OverridesParser.create()
    axes = [[f"{key}={value}" for value in parser.parse_override(f"{key}={values}").sweep_string_iterator()]
            for key, values in cfg.hydra.sweeper.params.items()]
    return [list(point) for point in itertools.product(*axes)]


def test_there_are_experiments():
    assert {"rank_sweep", "rank_sweep_fixed_scale", "alpha_sweep", "scaling", "target_modules",
            "lora_vs_full"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_sweep_point_is_a_valid_config(tmp_path, experiment):
    points = sweep_points(experiment)
    assert len(points) >= 2
    for point in points:
        validate(compose([f"experiment={experiment}", *point, f"paths.output_dir={tmp_path}"]))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_a_couple_of_steps(tmp_path, base_cache, experiment):
    from loralab.run import train

    first, last = sweep_points(experiment)[0], sweep_points(experiment)[-1]
    for i, point in enumerate((first, last)):
        # the tiny model made 128 wide, as wide as the default: room for every experiment's largest rank
        cfg = compose([f"experiment={experiment}", *point, *TINY, "model.n_embd=128", "trainer.max_steps=2",
                       "logger=none", f"paths.cache_dir={base_cache}", f"paths.output_dir={tmp_path / str(i)}"])
        assert train(cfg) > 0

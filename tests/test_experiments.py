"""Every named experiment in conf/experiment/ composes for each of its sweep points, passes
validation at its real size, and runs for a couple of steps (the default run composes each
swept value once; `-m slow` every sweep point and the runs)."""

import pytest

from loralab.config import validate
from loralab.jobs import expand, sweep_arguments

from conftest import ROOT, TINY, compose

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def sweep_points(experiment: str) -> list[list[str]]:
    """The jobs ``python train.py -m experiment=NAME`` launches, as lists of overrides, expanded
    by the sweeper's own code."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return expand(sweep_arguments(cfg.hydra.sweeper.params, []))


def test_there_are_experiments():
    assert {"rank_sweep", "rank_sweep_fixed_scale", "alpha_sweep", "scaling", "target_modules",
            "lora_vs_full"} <= set(EXPERIMENTS)


def covering_points(points: list[list[str]]) -> list[list[str]]:
    """A few of ``points`` that between them hold every override any point has (greedy set
    cover): each swept value once, in a handful of composes instead of the whole product."""
    uncovered, chosen = {o for point in points for o in point}, []
    while uncovered:
        best = max(points, key=lambda point: len(uncovered.intersection(point)))
        chosen.append(best)
        uncovered -= set(best)
    return chosen


def test_covering_points_hold_every_value_in_fewer_points():
    points = expand(["lora.rank=1,2,4", "optim.lr=1e-3,1e-2", "seed=1,2"])
    chosen = covering_points(points)
    assert len(chosen) == 3 and all(point in points for point in chosen)
    assert {o for point in chosen for o in point} == {o for point in points for o in point}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_swept_value_is_a_valid_config(tmp_path, experiment):
    points = sweep_points(experiment)
    assert len(points) >= 2
    for point in covering_points(points):
        validate(compose([f"experiment={experiment}", *point, f"paths.output_dir={tmp_path}"]))


@pytest.mark.slow  # one Hydra compose per job: 334 of them, minutes
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_sweep_point_is_a_valid_config(tmp_path, experiment):
    for point in sweep_points(experiment):
        validate(compose([f"experiment={experiment}", *point, f"paths.output_dir={tmp_path}"]))


# (in, out) of each Linear a GPT block has, for a model n_embd wide
LINEAR_SHAPES = {"q_proj": (1, 1), "k_proj": (1, 1), "v_proj": (1, 1), "o_proj": (1, 1),
                 "fc_in": (1, 4), "fc_out": (4, 1)}


def expected_trainable(cfg) -> int:
    """What the run must train, counted from its config alone: Σ r·(in + out) over the
    adapted Linears of every block plus the modules_to_save, or every weight for full fine-tuning."""
    from loralab.config import model_config_of
    from loralab.model_kinds import build_model

    n_layer, n_embd = cfg.model.n_layer, cfg.model.n_embd
    model = build_model(model_config_of(cfg.model))
    if not cfg.lora.enabled:
        return sum(p.numel() for p in model.parameters())
    saved = sum(p.numel() for name, module in model.named_modules()
                if name.rsplit(".", 1)[-1] in cfg.lora.modules_to_save for p in module.parameters())
    targets = LINEAR_SHAPES if cfg.lora.target_modules == "all-linear" else cfg.lora.target_modules
    return n_layer * sum(cfg.lora.rank * n_embd * sum(LINEAR_SHAPES[name]) for name in targets) + saved


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_a_couple_of_steps_with_its_own_settings(tmp_path, base_cache, experiment):
    from loralab.run import train

    from conftest import read_summary

    first, last = sweep_points(experiment)[0], sweep_points(experiment)[-1]
    for i, point in enumerate((first, last)):
        # the tiny model made 128 wide, as wide as the default: room for every experiment's largest rank
        # (a vision experiment keeps its own small ViT and data, its base pretrained briefly)
        tiny = ["base.steps=30"] if experiment.startswith("vit") else [*TINY, "model.n_embd=128"]
        cfg = compose([f"experiment={experiment}", *point, *tiny, "trainer.max_steps=2",
                       "logger=none", f"paths.cache_dir={base_cache}", f"paths.output_dir={tmp_path / str(i)}"])
        best = train(cfg)
        s = read_summary(tmp_path / str(i))
        assert s["status"] == "completed" and best == s["metrics"]["best/val_loss"]
        assert s["metrics"]["params/trainable"] == expected_trainable(cfg), point

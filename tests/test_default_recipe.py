"""The package defaults are the recipe study's winner: `TrainConfig()` and `loopus run`'s quick profile
train exactly the recipe of `bench/recipes.py`'s DEFAULT_ARM, so neither can drift from the measured arm."""

import importlib.util
from pathlib import Path

import pytest

from loopus.commands.run import PROFILES
from loopus.train import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "bench" / "recipes.py"
# what defines a recipe (not the run's length, data or bookkeeping)
RECIPE_KEYS = ["mode", "lr", "schedule", "min_lr_ratio", "freeze", "depth_lora_rank", "adapter_lr_mult",
               "gate_rank", "gate_init", "horizon_min", "horizon_max", "supervised_min", "supervised_max",
               "grad_steps", "supervise_first", "new_module_lr_mult", "beta_mono", "lambda_conf", "kl_base",
               "packing"]
ABSENT_MEANS = {"kl_base": 0.0}  # a setting an arm may leave out, and what leaving it out means


@pytest.fixture(scope="module")
def winner() -> dict:
    spec = importlib.util.spec_from_file_location("recipes", RECIPES)
    recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipes)
    return {**recipes.COMMON, **recipes.ARMS[recipes.DEFAULT_ARM][1]}


def test_train_config_defaults_are_the_winning_recipe(winner: dict) -> None:
    defaults = TrainConfig(max_steps=1)
    for key in RECIPE_KEYS:
        expected = winner[key] if key in winner else ABSENT_MEANS[key]
        assert getattr(defaults, key) == expected, key
    steps = winner["max_tokens"] // (winner["seq_len"] * winner["batch_size"])
    assert defaults.warmup_steps is None and defaults.warmup_ratio == winner["warmup_steps"] / steps


def test_quick_profile_reads_the_winners_data(winner: dict) -> None:
    quick = PROFILES["quick"]["train"]
    assert quick["corpus"] == winner["corpus"]
    assert quick["rows_per_doc"] == winner["rows_per_doc"]
    assert quick["seq_len"] == winner["seq_len"] and quick["batch_size"] == winner["batch_size"]
    assert not set(quick) & set(RECIPE_KEYS), "the quick profile must take the recipe from TrainConfig"

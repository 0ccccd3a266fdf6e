"""The package defaults are the recipe study's winner: `TrainConfig()`, `loopus.train.recipes.DEFAULT` and
`loopus run`'s quick profile train exactly the recipe of the study's winning arm, so none can drift from
the measured arm."""

import pytest

from loopus.commands.run import PROFILES
from loopus.train import Runtime, TrainConfig, resolve
from loopus.train.recipes import DEFAULT

# what defines a recipe (not the run's length, data or bookkeeping)
RECIPE_KEYS = ["mode", "lr", "schedule", "min_lr_ratio", "freeze", "depth_lora_rank", "adapter_lr_mult",
               "gate_rank", "gate_init", "horizon_min", "horizon_max", "supervised_min", "supervised_max",
               "grad_steps", "supervise_first", "new_module_lr_mult", "beta_mono", "lambda_conf", "kl_base",
               "packing"]
ABSENT_MEANS = {"kl_base": 0.0}  # a setting an arm may leave out, and what leaving it out means
# The study's winning arm, fp_depth_spread_lr7e-6 (bench/recipes.py's DEFAULT_ARM; docs/RESULTS.md, "The
# default"), with the settings it was trained with.
WINNING_ARM = {
    "model": "gemma-3-270m", "encoder_layers": 6, "decoder_layers": 3, "corpus": ["enwiki", "eltec_eng"],
    "seq_len": 128, "batch_size": 4, "max_tokens": 102_400, "lr": 7e-6, "warmup_steps": 20, "schedule": "cosine",
    "min_lr_ratio": 0.1, "freeze": ["embeddings", "encoder"], "depth_lora_rank": 16, "packing": "documents",
    "gate_rank": 64, "horizon_min": 2, "supervised_min": 2, "supervised_max": 2, "grad_steps": 1, "beta_mono": 0.1,
    "lambda_conf": 0.1, "seed": 0, "mode": "loopus", "gate_init": 0.02, "horizon_max": 4, "supervise_first": True,
    "new_module_lr_mult": 1000.0, "adapter_lr_mult": 10.0, "rows_per_doc": 2,
}


@pytest.fixture(scope="module")
def winner() -> dict:
    return WINNING_ARM


def test_train_config_defaults_are_the_winning_recipe(winner: dict) -> None:
    defaults = resolve(TrainConfig.of(max_steps=1), Runtime()).flat()
    recipe = TrainConfig.of(max_steps=1, **DEFAULT).flat()
    for key in RECIPE_KEYS:
        expected = winner[key] if key in winner else ABSENT_MEANS[key]
        assert defaults[key] == expected, key
        assert recipe[key] == expected, key
    steps = winner["max_tokens"] // (winner["seq_len"] * winner["batch_size"])
    assert defaults["warmup_steps"] is None and defaults["warmup_ratio"] == winner["warmup_steps"] / steps


def test_quick_profile_reads_the_winners_data(winner: dict) -> None:
    quick = PROFILES["quick"]["train"]
    assert quick["corpus"] == winner["corpus"]
    assert quick["rows_per_doc"] == winner["rows_per_doc"]
    assert quick["seq_len"] == winner["seq_len"] and quick["batch_size"] == winner["batch_size"]
    assert not set(quick) & set(RECIPE_KEYS), "the quick profile must take the recipe from TrainConfig"

"""The built-in training recipe: ``python -m trainfleet.train`` or ``trainfleet train``."""
from trainfleet.train.recipe import RecipeRun, TrainConfig, run

__all__ = ["RecipeRun", "TrainConfig", "run"]

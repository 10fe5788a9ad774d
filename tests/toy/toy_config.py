"""Toy LazyConfig: a linear model on random tensors, trained by the real engine."""
import os
import sys

from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(__file__))
from toy_components import ToyEvaluator, ToyRegressor, ToyTrainLoader, toy_test_loader  # noqa: E402

from voxelsplat.model_zoo import get_config  # noqa: E402

# The shipped common pieces, loaded through the model zoo as a user outside the repo would.
train = get_config("common/train.py").train
optimizer = get_config("common/optim.py").AdamW
lr_multiplier = get_config("common/schedule.py").step_lr_multiplier

model = L(ToyRegressor)(in_features=8)

dataloader = OmegaConf.create()
dataloader.train = L(ToyTrainLoader)(total_batch_size=8, in_features=8, seed=0)
dataloader.test = L(toy_test_loader)(num_samples=16, in_features=8)
dataloader.evaluator = L(ToyEvaluator)()

train.max_iter = 20
train.device = "cpu"
train.seed = 0
train.log_period = 5
train.eval_period = 10
train.checkpointer.period = 5
train.output_dir = "./output/toy"
lr_multiplier.warmup_iters = 2
optimizer.lr = 0.05
optimizer.params.lr_multipliers = {"linear": 1.0, "norm": 0.5}

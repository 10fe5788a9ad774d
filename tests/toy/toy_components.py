"""A tiny model, data and evaluator for exercising the training engine."""
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from torch import nn


class ToyRegressor(nn.Module):
    """Linear regression from ``x`` (D,) to ``y`` (1,) with detectron2 model I/O."""

    def __init__(self, in_features: int = 8, nan_at_call: int = -1):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.norm = nn.LayerNorm(in_features)
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, batched_inputs):
        x = torch.stack([d["x"] for d in batched_inputs])
        pred = self.linear(self.norm(x)).squeeze(-1)
        if not self.training:
            return [{"y": p} for p in pred]
        self.calls += 1
        y = torch.stack([d["y"] for d in batched_inputs])
        loss = ((pred - y) ** 2).mean()
        aux = (self.linear.weight ** 2).sum() * 1e-3
        if self.calls - 1 == self.nan_at_call:
            aux = aux * float("nan")
        return {"loss_mse": loss, "loss_weight_l2": aux}


def _toy_batch(total_batch_size: int, in_features: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(total_batch_size, in_features, generator=generator)
    true_w = torch.linspace(-1, 1, in_features)
    y = x @ true_w + 0.1 * torch.randn(total_batch_size, generator=generator)
    return x, y


class ToyTrainLoader:
    """Yields the same global batch every iteration; each rank takes its shard, so
    N processes with batch B/N see what one process with batch B sees."""

    def __init__(self, total_batch_size: int = 8, in_features: int = 8, seed: int = 0):
        world, rank = comm.get_world_size(), comm.get_rank()
        if total_batch_size % world:
            raise ValueError(f"total_batch_size {total_batch_size} is not divisible by {world} processes")
        x, y = _toy_batch(total_batch_size, in_features, seed)
        self.batch = [{"x": x[i], "y": y[i]} for i in range(rank, total_batch_size, world)]

    def __iter__(self):
        while True:
            yield self.batch


def toy_test_loader(num_samples: int = 16, in_features: int = 8, seed: int = 1):
    x, y = _toy_batch(num_samples, in_features, seed)
    world, rank = comm.get_world_size(), comm.get_rank()
    return [[{"x": x[i], "y": y[i]}] for i in range(rank, num_samples, world)]


class ToyEvaluator(DatasetEvaluator):
    def reset(self):
        self.errors = []

    def process(self, inputs, outputs):
        for i, o in zip(inputs, outputs):
            self.errors.append(float((i["y"] - o["y"]) ** 2))

    def evaluate(self):
        errors = sum(comm.gather(self.errors, dst=0), [])
        if not comm.is_main_process():
            return {}
        return {"toy": {"mse": sum(errors) / len(errors), "count": float(len(errors))}}

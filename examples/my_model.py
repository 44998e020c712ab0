"""A user's own model for the CLI: ``autopar plan examples/my_model.py:build --cluster dgx-h100:16 ...``.

A factory returns the model (on ``meta`` when asked, so nothing is allocated), example inputs and
the loss function; the inputs' batch dimension is rescaled by the planner.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class DeepMLP(nn.Module):
    """A residual MLP classifier: ``layers`` identical blocks between an input and an output layer."""

    def __init__(self, features: int = 1024, width: int = 4096, layers: int = 24, classes: int = 1000):
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def build(device: str = "meta", batch: int = 8):
    with torch.device(device):
        model = DeepMLP()
        x = torch.randn(batch, 1024)
        y = torch.randint(0, 1000, (batch,))
    return model, (x, y), F.cross_entropy

"""A small two-output model for scikit-learn's diabetes data (real measurements, bundled offline).

Input: the 10 raw clinical features of a patient (age, sex, BMI, blood pressure and six blood
serum measurements), float32 ``[batch, 10]``; the standardisation is part of the model, so a
device passes raw values. Outputs: ``progression`` (regression: the disease progression score one
year later, ``[batch, 1]``) and ``risk`` (2 class logits: progression above the training median).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DiabetesNet"]


class DiabetesNet(nn.Module):
    """10 features -> 32 -> 32 -> (progression, risk logits)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        # feature and target scaling, set by train.py from the training split; saved with the weights
        self.register_buffer("mean", torch.zeros(10))
        self.register_buffer("std", torch.ones(10))
        self.register_buffer("y_scale", torch.tensor([150.0, 77.0]))
        self.body = nn.Sequential(
            nn.Linear(10, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.progression = nn.Linear(hidden, 1)
        self.risk = nn.Linear(hidden, 2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body((features - self.mean) / self.std)
        return self.progression(h) * self.y_scale[1] + self.y_scale[0], self.risk(h)

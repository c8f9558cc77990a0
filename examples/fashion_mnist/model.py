"""Reference models for 28x28 grayscale Fashion-MNIST: a CNN (the default), an LSTM and a transformer."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PatchTransformer", "RowLSTM", "SmallCNN"]


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Two conv-conv-pool blocks and a two-layer classifier: about 270 k parameters, 19 M MACs.

    Args:
        num_classes: size of the output layer.
        width: channels of the first block; the second block has twice as many.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(1, w),
            *_block(w, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            *_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * 7 * 7, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class RowLSTM(nn.Module):
    """A recurrent classifier: the 28 image rows are 28 time steps of 28 features.

    Args:
        num_classes: size of the output layer.
        hidden: LSTM hidden size.
    """

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        seq = x.flatten(1, 2)  # (N, 1, 28, 28) -> (N, 28, 28): rows as time steps
        out, _ = self.lstm(seq)
        return self.fc(out[:, -1])


class _EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: LayerNorm, multi-head attention, LayerNorm, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """A small vision transformer: 4x4 patches (49 tokens), a class token, pre-norm encoder blocks.

    Args:
        num_classes: size of the output layer.
        dim: token width.
        depth: encoder blocks.
        heads: attention heads.
        mlp: hidden width of each block's MLP.
    """

    def __init__(
        self, num_classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 50, dim) * 0.02)
        self.blocks = nn.Sequential(*[_EncoderBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, 49, dim)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])

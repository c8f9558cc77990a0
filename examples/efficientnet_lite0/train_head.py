"""Train the Fashion-MNIST head of EfficientNetLite0FMNIST on frozen pretrained features.

    python examples/efficientnet_lite0/train_head.py --train 12000

Features of the frozen backbone are computed once (the slow part: ~10 ms per image on 2 cores at
112x112), then a linear softmax head is fitted on them and saved as ``head.safetensors`` (50 kB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from model import HEAD_FILE, EfficientNetLite0FMNIST

from edgesmith.data import FASHION_MNIST_PREPROCESS, _as_model_input, read_fashion_mnist
from edgesmith.fsutil import atomic_write_bytes
from edgesmith.progress import track


def extract(
    model: EfficientNetLite0FMNIST, x: torch.Tensor, what: str, batch: int = 128
) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [
                model.features(x[i : i + batch])
                for i in track(range(0, len(x), batch), f"features: {what}")
            ]
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument(
        "--train", type=int, default=12000, help="training images used (features are the slow part)"
    )
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HEAD_FILE))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    shape = [1, 1, 28, 28]
    xtr, ytr = read_fashion_mnist(args.data, "train")
    xte, yte = read_fashion_mnist(args.data, "test")
    idx = np.random.default_rng(args.seed).permutation(len(xtr))[: args.train]
    x_train = torch.from_numpy(
        _as_model_input(xtr[idx], FASHION_MNIST_PREPROCESS, shape, "float32")
    )
    x_test = torch.from_numpy(_as_model_input(xte, FASHION_MNIST_PREPROCESS, shape, "float32"))
    y_train, y_test = torch.from_numpy(ytr[idx]), torch.from_numpy(yte)

    model = EfficientNetLite0FMNIST(resolution=args.resolution, head=None).eval()
    t0 = time.time()
    f_train, f_test = extract(model, x_train, "train"), extract(model, x_test, "test")
    print(f"features: {len(f_train)} + {len(f_test)} in {time.time() - t0:.0f} s", flush=True)

    mu, sigma = f_train.mean(0), f_train.std(0) + 1e-6  # standardise for a well-conditioned fit ...
    head = nn.Linear(f_train.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-4)
    z_train, z_test = (f_train - mu) / sigma, (f_test - mu) / sigma
    for _epoch in track(range(args.epochs), "head"):
        perm = torch.randperm(len(z_train))
        for i in range(0, len(z_train), 512):
            b = perm[i : i + 512]
            opt.zero_grad()
            nn.functional.cross_entropy(
                head(z_train[b]), y_train[b], label_smoothing=0.05
            ).backward()
            opt.step()
    with torch.no_grad():
        acc = (head(z_test).argmax(1) == y_test).float().mean().item()
        # ... then fold the standardisation into the layer: W' = W / sigma, b' = b - W' @ mu
        w = head.weight / sigma
        b = head.bias - w @ mu
        check = ((f_test @ w.T + b).argmax(1) == y_test).float().mean().item()
    assert abs(check - acc) < 1e-3, (check, acc)
    from safetensors.torch import save

    atomic_write_bytes(
        Path(args.out),
        save(
            {"head.weight": w.contiguous(), "head.bias": b.contiguous()},
            metadata={
                "test_top1": f"{acc:.4f}",
                "train_images": str(args.train),
                "resolution": str(args.resolution),
            },
        ),
    )
    print(f"saved {args.out}; test top-1 {acc:.4f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

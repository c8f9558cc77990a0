"""Train a reference model on Fashion-MNIST and save its weights as safetensors.

    python examples/fashion_mnist/train.py                         # SmallCNN -> weights.safetensors
    python examples/fashion_mnist/train.py --arch lstm             # RowLSTM -> lstm.safetensors
    python examples/fashion_mnist/train.py --arch transformer      # PatchTransformer -> transformer.safetensors

SmallCNN reaches about 93% test accuracy in 4 epochs (about 4 minutes on 2 CPU cores).
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
from model import PatchTransformer, RowLSTM, SmallCNN

from edgesmith.data import FASHION_MNIST_PREPROCESS, _as_model_input, read_fashion_mnist
from edgesmith.fsutil import atomic_write_bytes
from edgesmith.progress import track

ARCHS = {
    "cnn": (SmallCNN, "weights.safetensors"),
    "lstm": (RowLSTM, "lstm.safetensors"),
    "transformer": (PatchTransformer, "transformer.safetensors"),
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="cnn")
    ap.add_argument(
        "--out", default=None, help="default: the architecture's file next to this script"
    )
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    shape = [1, 1, 28, 28]
    xtr, ytr = read_fashion_mnist(args.data, "train")
    xte, yte = read_fashion_mnist(args.data, "test")
    x_train = torch.from_numpy(_as_model_input(xtr, FASHION_MNIST_PREPROCESS, shape, "float32"))
    x_test = torch.from_numpy(_as_model_input(xte, FASHION_MNIST_PREPROCESS, shape, "float32"))
    y_train, y_test = torch.from_numpy(ytr), torch.from_numpy(yte)

    model_cls, default_out = ARCHS[args.arch]
    args.out = args.out or str(Path(__file__).parent / default_out)
    model = model_cls()
    steps = args.epochs * ((len(x_train) + args.batch_size - 1) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        batches = range(0, len(x_train), args.batch_size)
        for start in track(batches, f"epoch {epoch + 1}/{args.epochs}"):
            idx = perm[start : start + args.batch_size]
            xb = x_train[idx]
            flip = (
                torch.rand(len(xb), generator=gen) < 0.5
            )  # horizontal flips: clothes are left-right symmetric
            xb[flip] = xb[flip].flip(-1)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat(
                [model(x_test[i : i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)]
            )
        acc = (pred == y_test).float().mean().item()
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}  test top-1 {acc:.4f}  ({time.time() - t0:.0f} s)",
            flush=True,
        )

    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(
        Path(args.out),
        save(state, metadata={"test_top1": f"{acc:.4f}", "epochs": str(args.epochs)}),
    )
    print(
        f"saved {args.out} ({Path(args.out).stat().st_size} bytes); test top-1 {acc:.4f}; {np.round(time.time() - t0)} s"
    )


if __name__ == "__main__":
    main()

"""Train DiabetesNet on the training split and save ``weights.safetensors`` (seconds on a CPU).

Run: python examples/diabetes/train.py   (R² about 0.5 on the 88 held-out patients, as a linear
regression; the data are small and noisy.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def main(epochs: int = 150, seed: int = 0) -> dict[str, float]:
    import sys

    sys.path.insert(0, str(HERE))
    from data import load
    from model import DiabetesNet
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    xtr, ytr, xte, yte, median = load(seed)
    m = DiabetesNet()
    m.mean.copy_(torch.from_numpy(xtr.mean(0)))
    m.std.copy_(torch.from_numpy(xtr.std(0)))
    m.y_scale.copy_(torch.tensor([ytr.mean(), ytr.std()]))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3, weight_decay=1e-2)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    scale = m.y_scale
    m.train()
    for _ in range(epochs):  # full batch: 354 patients
        reg, logits = m(x)
        loss = nn.functional.mse_loss((reg[:, 0] - scale[0]) / scale[1], (y - scale[0]) / scale[1])
        loss = loss + nn.functional.cross_entropy(logits, (y > median).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        reg, logits = m(torch.from_numpy(xte))
    p, t = reg[:, 0].numpy().astype(np.float64), yte.astype(np.float64)
    r2 = float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())
    acc = float((logits.argmax(1).numpy() == (yte > median)).mean())
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items()}, str(HERE / "weights.safetensors")
    )
    return {"r2": round(r2, 4), "risk_accuracy": round(acc, 4)}


if __name__ == "__main__":
    print(main())

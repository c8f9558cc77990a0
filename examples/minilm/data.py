"""Real English sentences from the licence texts every Debian/Ubuntu system has, tokenized.

Sentences: each non-symlink file in ``/usr/share/common-licenses`` (package base-files), paragraphs
joined, split at sentence ends, 6 to 60 words, no mostly-uppercase lines, deduplicated, ordered by
SHA-256 (independent of the file listing): 830 sentences here, median 34 tokens, longest 113.
Evaluation: the first 256; calibration: the next 128; training (distillation, pruning): the rest.

A sample is ``((input_ids, attention_mask), target)``: int64 token ids at the sentence's own length
(the build pads a batch to its longest sentence) and, as the target, the pretrained model's fp32
embedding of the sentence, so that the metric ``mean_cosine`` is 1.0 for the model as published.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

__all__ = ["encode", "make_datasets", "make_small", "mean_cosine", "sentences", "tokenizer"]

ROOT = Path("/usr/share/common-licenses")
MAX_LENGTH = 128
_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z(\"'])")


def sentences(root: Path = ROOT, min_words: int = 6, max_words: int = 60) -> list[str]:
    """The sentences of the licence texts, in a stable order."""
    seen: set[str] = set()
    out: list[str] = []
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink())
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for para in re.split(r"\n\s*\n", text):
            for s in _END.split(" ".join(para.split())):
                s = s.strip()
                if not min_words <= len(s.split()) <= max_words:
                    continue
                letters = [c for c in s if c.isalpha()]
                if not letters or sum(c.isupper() for c in letters) > 0.5 * len(letters):
                    continue
                if s.lower() in seen:
                    continue
                seen.add(s.lower())
                out.append(s)
    out.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return out


def _model(name: str):  # type: ignore[no-untyped-def]
    """A function of the sibling ``model.py`` (the module the recipe's model factory loads)."""
    from edgesmith.refs import resolve_ref

    return resolve_ref(f"{Path(__file__).with_name('model.py')}:{name}", what="model factory")


def tokenizer(max_length: int = MAX_LENGTH):  # type: ignore[no-untyped-def]
    """The model's WordPiece tokenizer (``tokenizers``, Rust: no torch needed on a device)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_model("model_dir")() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.no_padding()
    return tok


def encode(texts: list[str], max_length: int = MAX_LENGTH) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input_ids, attention_mask)`` per text, int64, at its own length (at most ``max_length``)."""
    return [
        (np.asarray(e.ids, np.int64), np.asarray(e.attention_mask, np.int64))
        for e in tokenizer(max_length).encode_batch(texts)
    ]


def _embed(model, pairs: list[tuple[np.ndarray, np.ndarray]], batch: int = 64) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The model's embeddings of tokenized sentences: batches of similar length, padded (the
    mask keeps padding out of the mean: the same embeddings to ~1e-7)."""
    import torch

    order = np.argsort([len(ids) for ids, _ in pairs], kind="stable")
    out = np.zeros((len(pairs), 384), np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            width = max(len(pairs[i][0]) for i in idx)
            ids = np.zeros((len(idx), width), np.int64)
            mask = np.zeros((len(idx), width), np.int64)
            for row, i in enumerate(idx):
                n = len(pairs[i][0])
                ids[row, :n], mask[row, :n] = pairs[i]
            out[idx] = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return out


class Sentences:
    """A torch-style dataset of ``((input_ids, attention_mask), embedding)``."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], targets: np.ndarray) -> None:
        self.pairs, self.targets = pairs, targets

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.pairs[i], self.targets[i]


def make_datasets(n_eval: int = 256, n_calibration: int = 128, n_train: int | None = None):  # type: ignore[no-untyped-def]
    """The recipe's data factory: (train, calibration, eval) splits of the licence sentences."""
    texts = sentences()
    ev = texts[:n_eval]
    cal = texts[n_eval : n_eval + n_calibration]
    tr = texts[n_eval + n_calibration :][:n_train]
    model = _model("make_encoder")()
    splits = []
    for part in (tr, cal, ev):
        pairs = encode(part)
        splits.append(Sentences(pairs, _embed(model, pairs)))
    return tuple(splits)


def make_small():  # type: ignore[no-untyped-def]
    """A small split for quick tests: 48 evaluation, 32 calibration, 64 training sentences."""
    return make_datasets(n_eval=48, n_calibration=32, n_train=64)


def mean_cosine(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cosine similarity of each output embedding with its target (1.0: identical)."""
    a = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
    b = np.asarray(targets, np.float64).reshape(len(targets), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())

"""Planted-topic corpora for the clustering and importance-weight tests."""

from __future__ import annotations

import json
import os

import numpy as np

SHARED = ["the", "and", "of", "to", "in", "is", "that", "for"]
"""Filler words every planted document shares."""


def planted_doc(rng: np.random.Generator, vocabs: list[list[str]], words_each: int = 12) -> str:
    """A document drawing ``words_each`` words from each vocabulary plus shared filler words."""
    words = [w for v in vocabs for w in rng.choice(v, size=words_each)]
    words += list(rng.choice(SHARED, size=len(words) // 2))
    rng.shuffle(words)
    return " ".join(words)


def flat_vocab(d: int) -> list[str]:
    return [f"dom{d}w{j}" for j in range(40)]


def planted_corpus(num_domains: int, docs_per_domain: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Docs from ``num_domains`` disjoint vocabularies, shuffled; returns (texts, planted labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_domains), docs_per_domain)
    rng.shuffle(labels)
    return [planted_doc(rng, [flat_vocab(d)]) for d in labels], labels


def write_jsonl(path, texts, extra=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": f"{os.path.basename(path)}-{i}"} if extra else {"text": t}) + "\n")
            if i % 17 == 0:
                f.write("\n")  # blank lines are skipped, not counted as documents

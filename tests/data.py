"""Small, learnable training sets built in code (no downloads, nothing copied from data sets)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

POSITIVE = ["great", "lovely", "wonderful", "excellent", "delightful", "superb"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "poor", "bad"]
SUBJECTS = ["the food", "the service", "this film", "the room", "our trip", "the book", "the music"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        rows.append({"text": f"{rng.choice(SUBJECTS)} was {word}", "label": "pos" if positive else "neg"})
    return rows


def jsonl(rows: Sequence[Mapping[str, object]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)

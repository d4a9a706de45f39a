"""Small, learnable training sets built in code (no downloads, nothing copied from data sets)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

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


PEOPLE = ["John Smith", "Mary Jones", "Peter Brown", "Anna White", "David Green", "Laura Black", "Tom", "Sara"]
PLACES = ["Paris", "London", "New York", "Berlin", "Madrid", "Rome", "San Francisco", "Tokyo"]
TEMPLATES = [
    "{per} lives in {loc} .",
    "{per} flew to {loc} yesterday .",
    "we met {per} in {loc} .",
    "the office in {loc} hired {per} .",
    "{per} and {per2} visited {loc} last week .",
    "nobody went to the market today .",
]


def entity_tags(words: list[str], kind: str) -> list[str]:
    return [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


def ner_rows(n: int, seed: int, scheme: str = "IOB2") -> list[dict[str, Any]]:
    """Templated sentences with PER and LOC entities; tags in `scheme` (IOB2 or BIOES)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        fill = {"per": rng.choice(PEOPLE), "per2": rng.choice(PEOPLE), "loc": rng.choice(PLACES)}
        tokens: list[str] = []
        tags: list[str] = []
        for word in template.split():
            if word.startswith("{"):
                kind = "LOC" if word == "{loc}" else "PER"
                parts = fill[word[1:-1]].split()
                tokens.extend(parts)
                tags.extend(entity_tags(parts, kind))
            else:
                tokens.append(word)
                tags.append("O")
        if scheme == "BIOES":
            tags = to_bioes(tags)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def to_bioes(tags: list[str]) -> list[str]:
    out = []
    for i, tag in enumerate(tags):
        nxt = tags[i + 1] if i + 1 < len(tags) else "O"
        last = not nxt.startswith("I-")
        if tag.startswith("B-"):
            out.append(("S-" if last else "B-") + tag[2:])
        elif tag.startswith("I-"):
            out.append(("E-" if last else "I-") + tag[2:])
        else:
            out.append(tag)
    return out


COLORS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "blood": "red",
    "sun": "yellow",
    "orange": "orange",
    "rose": "pink",
}


def color_rows(repeat: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"what color is the {k} ?", "completion": f" the {k} is {v} ."} for k, v in COLORS.items()
    ] * repeat


def preference_rows(repeat: int = 1) -> list[dict[str, Any]]:
    """Each thing's right colour preferred over the next thing's colour."""
    colors = list(COLORS.items())
    rows = []
    for i, (thing, color) in enumerate(colors):
        wrong = colors[(i + 1) % len(colors)][1]
        rows.append({
            "input": {"messages": [{"role": "user", "content": f"what color is the {thing} ?"}]},
            "preferred_output": [{"role": "assistant", "content": f"the {thing} is {color} ."}],
            "non_preferred_output": [{"role": "assistant", "content": f"the {thing} is {wrong} ."}],
        })
    return rows * repeat

"""Constrained IOB2 decoding: the most likely valid sequence, as an exhaustive search finds it."""

from __future__ import annotations

import itertools

import numpy as np

from training.tagging import IOB2Decoder

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]


def _valid(tags: list[str]) -> bool:
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous not in (f"B-{tag[2:]}", f"I-{tag[2:]}"):
            return False
        previous = tag
    return True


def test_it_finds_the_most_likely_valid_sequence() -> None:
    rng = np.random.default_rng(0)
    decoder = IOB2Decoder(LABELS)
    for words in (1, 2, 3, 5):
        for _ in range(20):
            log_probs = np.log(rng.dirichlet(np.ones(len(LABELS)), size=words))
            best = max((seq for seq in itertools.product(range(len(LABELS)), repeat=words)
                        if _valid([LABELS[i] for i in seq])),
                       key=lambda seq: sum(log_probs[t, i] for t, i in enumerate(seq)))
            assert decoder.decode(log_probs) == list(best)


def test_an_invalid_argmax_is_repaired_by_likelihood_not_by_guessing() -> None:
    decoder = IOB2Decoder(LABELS)
    # Word by word the tags are B-PER, I-ORG: a person then an organisation's continuation. The likeliest
    # valid reading keeps one entity, the type its words favour together.
    probs = np.array([[0.05, 0.60, 0.05, 0.25, 0.05],
                      [0.05, 0.05, 0.40, 0.05, 0.45]])
    assert [LABELS[i] for i in probs.argmax(axis=1)] == ["B-PER", "I-ORG"]
    assert decoder.tags(np.log(probs)) == ["B-PER", "I-PER"]
    # A sentence cannot open with I-.
    assert decoder.tags(np.log(np.array([[0.30, 0.05, 0.60, 0.0, 0.05]]) + 1e-12)) == ["O"]
    assert decoder.tags(np.zeros((0, len(LABELS)))) == []


def test_labels_without_prefixes_decode_as_the_argmax() -> None:
    rng = np.random.default_rng(1)
    log_probs = np.log(rng.dirichlet(np.ones(3), size=6))
    assert IOB2Decoder(["A", "B", "C"]).decode(log_probs) == [int(i) for i in log_probs.argmax(axis=1)]

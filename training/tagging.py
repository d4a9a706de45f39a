"""Constrained decoding of IOB2 tags: the best tag sequence that is a valid one.

Taking each word's most likely tag on its own can produce sequences no annotator would write: `O I-ORG`, or
`B-PER I-LOC`. Reading them as conlleval does (an I- that opens an entity counts as B-) repairs the first
kind by guessing; the second splits one entity into two of different types. Viterbi over the per-word
log-probabilities, with those transitions forbidden, picks instead the most likely sequence among the valid
ones: no CRF layer and no training change, only the decoding (as used with BERT taggers trained with
softmax heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_FORBIDDEN = -1e9


def _transitions(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(start scores [L], transition scores [L_prev, L_next]): 0 where allowed, a large negative elsewhere.

    IOB2: `I-X` may follow only `B-X` or `I-X`, and may not start a sentence; everything else is allowed.
    """
    n = len(labels)
    start = np.zeros(n, dtype=np.float64)
    moves = np.zeros((n, n), dtype=np.float64)
    for j, label in enumerate(labels):
        if not label.startswith("I-"):
            continue
        start[j] = _FORBIDDEN
        kind = label[2:]
        for i, previous in enumerate(labels):
            if previous not in (f"B-{kind}", f"I-{kind}"):
                moves[i, j] = _FORBIDDEN
    return start, moves


class IOB2Decoder:
    """Viterbi over IOB2 labels (`labels[i]` is the tag of column i of the log-probabilities)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self._start, self._moves = _transitions(self.labels)

    def decode(self, log_probs: np.ndarray) -> list[int]:
        """The label indices of the most likely valid sequence, for log-probabilities of shape [words, labels]."""
        words = int(log_probs.shape[0])
        if words == 0:
            return []
        score = log_probs[0] + self._start
        back = np.zeros((words, len(self.labels)), dtype=np.int64)
        for t in range(1, words):
            candidates = score[:, None] + self._moves
            back[t] = candidates.argmax(axis=0)
            score = candidates[back[t], np.arange(len(self.labels))] + log_probs[t]
        path = [int(score.argmax())]
        for t in range(words - 1, 0, -1):
            path.append(int(back[t, path[-1]]))
        return path[::-1]

    def tags(self, log_probs: np.ndarray) -> list[str]:
        return [self.labels[i] for i in self.decode(log_probs)]

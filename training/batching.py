"""Which rows go into which batch, and how a batch of pre-tokenised rows becomes padded tensors.

A batch pads every row to its longest one, so a batch of one long and fifteen short sentences spends most
of its compute on padding. `epoch_batches` groups rows of similar length the way `transformers`'
`LengthGroupedSampler` does (shuffle, cut into megabatches of `MEGABATCH_FACTOR` batches, sort each by
length, cut into batches), then shuffles the order of the batches, so the step's length does not follow a
pattern through the epoch. Every draw comes from one generator seeded with ``seed + epoch``, so the batches
of an epoch are a pure function of (lengths, batch size, seed, epoch): a run resumed mid-epoch rebuilds the
same list and continues at the batch it stopped at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

# As transformers' LengthGroupedSampler: large enough that neighbours in a sorted megabatch differ by a
# token or less, small enough that a batch still mixes rows from across the epoch.
MEGABATCH_FACTOR = 50


def epoch_batches(
    n_rows: int, batch_size: int, seed: int, epoch_index: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """Return the row indices of each batch of epoch `epoch_index`, length-grouped when `lengths` are given.

    Without `lengths` this is a plain seeded shuffle cut into batches (the order checkpoints written before
    length grouping existed resume in). Only the last batch can be short, wherever it lands in the epoch.
    """
    if lengths is not None and len(lengths) != n_rows:
        raise ValueError(f"{len(lengths)} lengths for {n_rows} rows")
    generator = torch.Generator()
    generator.manual_seed(seed + epoch_index)
    order = torch.randperm(n_rows, generator=generator)
    if lengths is None:
        return [order[start : start + batch_size].tolist() for start in range(0, n_rows, batch_size)]
    row_lengths = torch.as_tensor(lengths, dtype=torch.long)
    megabatch = batch_size * MEGABATCH_FACTOR
    batches: list[list[int]] = []
    for start in range(0, n_rows, megabatch):
        chunk = order[start : start + megabatch]
        # Stable, so rows of equal length keep their shuffled order and the result is seed-determined.
        chunk = chunk[torch.argsort(row_lengths[chunk], descending=True, stable=True)]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    shuffled: list[int] = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def shard_rows(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Return rank `rank`'s contiguous share of one global batch's rows; shares differ by at most one row.

    An item that is a list is a batch grouped ahead of time (generation's `GroupedBatches`, where a step's
    global batch is one such item), so its rows are what is shared out. Earlier ranks take the extra rows,
    so rank 0 never gets an empty share of a non-empty batch; later ranks may when a batch has fewer rows
    than there are ranks. Contiguous shares of a length-sorted batch pad less than strided ones, and a step
    waits for its slowest rank either way: the one holding the longest rows, padded to the same width.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    rows = [row for item in items for row in (item if isinstance(item, list) else [item])]
    base, extra = divmod(len(rows), world_size)
    start = rank * base + min(rank, extra)
    return rows[start : start + base + (1 if rank < extra else 0)]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Return the share of padded positions over all batches (each padded to its longest row)."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1.0 - real / max(1, padded)


def as_tensors(features: Sequence[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Turn tokenised features (lists of ids, integer labels) into tensors once, before training."""
    return [{key: torch.as_tensor(value, dtype=torch.long) for key, value in feature.items()} for feature in features]


def feature_lengths(features: Sequence[Mapping[str, Any]]) -> list[int]:
    """Return each feature's token count: what its row costs in a batch."""
    return [len(feature["input_ids"]) for feature in features]


class PaddingCollator:
    """Pad a batch of tensor features to its longest row: one `pad_sequence` call per key, no Python per token.

    `pad_values` maps a key to its padding value (input ids: the pad token; labels: -100); keys not named
    pad with 0 (attention mask, token type ids). 0-d values (a class label) are stacked. With
    `pad_to_multiple_of`, the width rounds up (tensor cores want multiples of 8; CPUs only pay for it).
    """

    def __init__(self, pad_values: Mapping[str, int], pad_to_multiple_of: int | None = None) -> None:
        self.pad_values = dict(pad_values)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [feature[key] for feature in features]
            if values[0].ndim == 0:
                batch[key] = torch.stack(values)
                continue
            pad = self.pad_values.get(key, 0)
            padded = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
            multiple = self.pad_to_multiple_of
            if multiple and padded.shape[1] % multiple:
                padded = torch.nn.functional.pad(padded, (0, multiple - padded.shape[1] % multiple), value=pad)
            batch[key] = padded
        return batch

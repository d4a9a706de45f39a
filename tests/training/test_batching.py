"""Length-grouped batches: a pure function of (seed, epoch), every row once, little padding, exact resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.conftest import Recorder
from training.batching import PaddingCollator, epoch_batches, padding_fraction
from training.trainer import TrainArgs, run_training

# Varied lengths, as sentences are: mostly short, a long tail.
LENGTHS = [min(120, 3 + int(random.Random(i).expovariate(1 / 18))) for i in range(1003)]


def test_grouped_batches_are_a_function_of_seed_and_epoch() -> None:
    first = epoch_batches(len(LENGTHS), 16, seed=7, epoch_index=2, lengths=LENGTHS)
    assert first == epoch_batches(len(LENGTHS), 16, seed=7, epoch_index=2, lengths=LENGTHS)
    assert first != epoch_batches(len(LENGTHS), 16, seed=7, epoch_index=3, lengths=LENGTHS)
    assert first != epoch_batches(len(LENGTHS), 16, seed=8, epoch_index=2, lengths=LENGTHS)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize(("n_rows", "batch_size"), [(1003, 16), (64, 8), (5, 16), (801, 16)])
def test_every_row_appears_exactly_once_per_epoch(n_rows: int, batch_size: int, grouped: bool) -> None:
    batches = epoch_batches(n_rows, batch_size, seed=1, epoch_index=0, lengths=LENGTHS[:n_rows] if grouped else None)
    assert len(batches) == -(-n_rows // batch_size)
    assert sorted(i for batch in batches for i in batch) == list(range(n_rows))
    # Only one batch may be short, wherever the shuffle put it.
    assert sum(len(batch) < batch_size for batch in batches) == (1 if n_rows % batch_size else 0)


def test_grouped_batches_pad_far_less_than_shuffled_ones() -> None:
    shuffled = padding_fraction(epoch_batches(len(LENGTHS), 16, 3, 0), LENGTHS)
    grouped = padding_fraction(epoch_batches(len(LENGTHS), 16, 3, 0, LENGTHS), LENGTHS)
    # Here about 0.69 against 0.08: the rest is the sparse long tail, where neighbours differ most.
    assert shuffled > 0.5
    assert grouped < shuffled / 5


def test_grouped_batch_order_is_shuffled_not_sorted() -> None:
    # Longest-first within each megabatch would tie the step's cost to the learning-rate schedule.
    widths = [max(LENGTHS[i] for i in batch) for batch in epoch_batches(len(LENGTHS), 16, 3, 0, LENGTHS)]
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)


def test_ungrouped_order_is_the_plain_seeded_shuffle() -> None:
    # Checkpoints written before grouping existed resume in exactly this order.
    generator = torch.Generator()
    generator.manual_seed(5 + 1)
    order = torch.randperm(50, generator=generator).tolist()
    assert epoch_batches(50, 8, seed=5, epoch_index=1) == [order[i : i + 8] for i in range(0, 50, 8)]


def test_padding_collator_pads_each_key_to_the_longest_row() -> None:
    features = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1]), "labels": torch.tensor(1)},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1]), "labels": torch.tensor(0)},
    ]
    batch = PaddingCollator({"input_ids": 99})(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    tagged = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([3, -100])}, {"input_ids": torch.tensor([4]),
              "labels": torch.tensor([5])}]
    padded = PaddingCollator({"labels": -100}, pad_to_multiple_of=8)(tagged)
    assert padded["labels"].tolist() == [[3, -100] + [-100] * 6, [5] + [-100] * 7]
    assert padded["input_ids"].shape == (2, 8)


class Bag(torch.nn.Module):
    """Mean of token embeddings into a linear head: enough to make every batch change the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        logits = self.head(pooled)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_paused_grouped_run_resumes_the_same_batch_sequence(tmp_path: Path) -> None:
    lengths = LENGTHS[:90]
    rng = random.Random(0)
    data = [{"input_ids": torch.tensor([rng.randrange(1, 50) for _ in range(n)]), "attention_mask": torch.ones(n,
             dtype=torch.long), "labels": torch.tensor(n % 2), "row": torch.tensor(i)} for i, n in enumerate(lengths)]
    seen: list[list[int]] = []
    pad = PaddingCollator({})

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seen.append([int(r["row"]) for r in rows])
        return pad([{k: v for k, v in r.items() if k != "row"} for r in rows])

    def run(directory: Path, callbacks: Recorder, resume: Path | None = None) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(0)
        model = Bag()
        args = TrainArgs(n_epochs=2, batch_size=8, learning_rate=0.05, checkpoint_dir=directory)
        return model, run_training(model, data, collate, args, callbacks, None, resume, torch.device("cpu"), lengths)

    model, outcome = run(tmp_path / "a", Recorder())
    uninterrupted, seen[:] = list(seen), []
    assert outcome.completed and len(uninterrupted) == outcome.total_steps == 2 * 12
    # Within each batch the rows are of similar length.
    assert padding_fraction(uninterrupted, lengths) < padding_fraction(epoch_batches(90, 8, 42, 0), lengths) / 2

    _, paused = run(tmp_path / "b", Recorder(stop_at=17, reason="pause"))
    assert paused.checkpoint is not None
    seen[:] = []
    resumed_model, resumed = run(tmp_path / "b", Recorder(), paused.checkpoint)
    assert resumed.completed and seen == uninterrupted[17:]
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, resumed_model.state_dict()[name], atol=1e-6), name

    # A checkpoint of grouped batches cannot silently resume in another order.
    args = TrainArgs(n_epochs=2, batch_size=8, learning_rate=0.05, checkpoint_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="length-grouped"):
        run_training(Bag(), data, collate, args, Recorder(), None, paused.checkpoint, torch.device("cpu"))

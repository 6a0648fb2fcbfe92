"""Real images, offline: scikit-learn's handwritten digits (``load_digits``, shipped
inside the package: 1,797 grey 8×8 images of 0–9, from the UCI optdigits set).

A class split makes the pretrain-then-adapt pair of the language runs: the base learns
digits 0–4 (``corpus=digits_0_4``), LoRA adapts it to digits 5–9 (``corpus=digits_5_9``)
with a new classification head. Labels are renumbered 0..4 within each half.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import TensorDataset

from loralab.data import SeededDataModule

DIGIT_CORPORA = {"digits_0_4": (0, 1, 2, 3, 4), "digits_5_9": (5, 6, 7, 8, 9)}
SPLIT_SEED = 0  # the train/val split is the same for every run seed: seeds vary training only


def digits(classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) scaled to [0, 1] and labels (N,) numbered 0.. in ``classes`` order."""
    from sklearn.datasets import load_digits  # the `vision` extra

    data = load_digits()
    keep = torch.isin(torch.from_numpy(data.target), torch.tensor(classes))
    images = torch.from_numpy(data.images).float()[keep].unsqueeze(1) / 16.0  # (N, 1, 8, 8): pixels are 0..16
    labels = torch.tensor([classes.index(t) for t in data.target[keep.numpy()]])  # (N,)
    return images, labels


class DigitsDataModule(SeededDataModule):
    """Train, validation and test images of one class split; the split is fixed.
    ``test_set`` is None with ``test_fraction=0`` (a base's digits)."""

    block_size = 1  # one example per image: val/tokens counts images

    def __init__(self, corpus: str, batch_size: int = 32, val_fraction: float = 0.2, test_fraction: float = 0.0,
                 seed: int = 0):
        super().__init__()
        if corpus not in DIGIT_CORPORA:
            raise ValueError(f"corpus={corpus!r} is not a digits split: expected one of {list(DIGIT_CORPORA)}")
        self.batch_size, self.seed = batch_size, seed
        images, labels = digits(DIGIT_CORPORA[corpus])
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_val = max(1, int(len(labels) * val_fraction))
        n_test = max(1, int(len(labels) * test_fraction)) if test_fraction else 0
        val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test]) if n_test else None
        self.fingerprint = hashlib.sha256(images[train].numpy().tobytes() + labels[train].numpy().tobytes()
                                          ).hexdigest()[:16]

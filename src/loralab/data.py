"""Real text, offline: corpora that ship with Python, or the user's own files.

The default experiment pretrains on the standard library's source code and
fine-tunes on Python's reference documentation (``pydoc_data.topics``): two
domains, no download. Text is tokenized to bytes, or by the tokenizer a GPT-2
checkpoint directory holds.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

CORPORA = ("python_stdlib", "pydoc_topics", "text")


class ByteTokenizer:
    """UTF-8 bytes as tokens: a 256-symbol vocabulary that needs no files."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def count(self, text: str) -> int:
        return len(text.encode("utf-8"))


class PretrainedTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` read from disk (a GPT-2 checkpoint's own)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_directory(cls, directory: str | Path) -> PretrainedTokenizer | None:
        """The GPT-2 tokenizer saved in ``directory``, or None if it holds none.

        ``tokenizer.json`` is read as it is; the older ``vocab.json`` + ``merges.txt`` pair
        is GPT-2's byte-level BPE, rebuilt the way ``transformers`` converts it (no
        prefix space, byte-level decoding), with ``tokenizers`` alone.
        """
        directory = Path(directory)
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return cls(Tokenizer.from_file(str(directory / "tokenizer.json")))
        if vocab.is_file() and merges.is_file():
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers

            tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
            return cls(tokenizer)
        return None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def count(self, text: str) -> int:
        return len(self.encode(text))


def tokenizer_of(pretrained: str | None) -> ByteTokenizer | PretrainedTokenizer:
    """The GPT-2 checkpoint directory's own tokenizer when it holds one, else bytes."""
    saved = PretrainedTokenizer.from_directory(pretrained) if pretrained else None
    return saved or ByteTokenizer()


def python_stdlib_text(max_bytes: int | None = None) -> str:
    """The standard library's top-level modules in sorted order, reading no more than needed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if max_bytes and size >= max_bytes:
            break
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
    return "\n".join(parts)


def pydoc_topics_text() -> str:
    """Python's reference documentation, topic by topic in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


# a text file may hold a stray bad byte (replaced on reading); more than this share is not UTF-8 text
MAX_UNDECODABLE = 0.01


def read_text_file(path: str) -> str:
    """The file's UTF-8 text; ValueError when it is binary (NUL bytes) or mostly not UTF-8."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data file {str(file)!r} does not exist")
    raw = file.read_bytes()
    if b"\0" in raw:
        raise ValueError(f"{file} holds NUL bytes: a binary file, not text")
    undecodable = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
    if undecodable > MAX_UNDECODABLE * len(raw):
        raise ValueError(f"{file} is not UTF-8 text: {undecodable / len(raw):.0%} of its bytes do not decode "
                         "(convert it first, e.g. `iconv -t utf-8`)")
    return raw.decode("utf-8", errors="replace")


class Splits(NamedTuple):
    """A corpus cut three ways: ``val`` chooses (the best lr, the best setting), ``test`` reports.
    ``test`` is empty where nothing is reported on it (a base's pretraining corpus)."""

    train: str
    val: str
    test: str


def corpus_splits(corpus: str, max_bytes: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.0,
                  train_path: str | None = None, val_path: str | None = None,
                  test_path: str | None = None) -> Splits:
    """Train, validation and test text. Built-in corpora hold out their last
    ``val_fraction + test_fraction`` (a deterministic cut at the end, never seen in
    training): the validation part first, the test part at the very end. ``corpus=text``
    reads ``val_path`` and ``test_path`` where given; without ``test_path`` the held-out
    text (the validation file, or the train file's tail) is cut in the same proportion."""
    if corpus == "text":
        text = read_text_file(train_path)
    elif corpus == "python_stdlib":
        text = python_stdlib_text(max_bytes)
    elif corpus == "pydoc_topics":
        text = pydoc_topics_text()
    else:
        raise ValueError(f"data corpus={corpus!r} is unknown: expected one of {list(CORPORA)}")
    test_share = 0.0 if test_path else test_fraction
    if corpus == "text" and val_path:
        train, held_out = text, read_text_file(val_path)
    else:
        text = text[:max_bytes] if max_bytes else text
        cut = int(len(text) * (1 - val_fraction - test_share))
        train, held_out = text[:cut], text[cut:]
    if corpus == "text" and test_path:
        return Splits(train, held_out, read_text_file(test_path))
    cut = round(len(held_out) * val_fraction / (val_fraction + test_share))  # 1/3 of 600 is 200, not 199
    return Splits(train, held_out[:cut], held_out[cut:])


def digest(*texts: str) -> str:
    """A short fingerprint of a corpus, part of the base-model cache key."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
    return h.hexdigest()[:16]


class TokenWindows(Dataset):
    """Non-overlapping windows of ``block_size + 1`` tokens: (input, next-token target)."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        if len(ids) < block_size + 1:
            raise ValueError(f"text of {len(ids)} tokens is shorter than one block of {block_size + 1}")
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, i: int):
        chunk = self.ids[i * self.block_size: (i + 1) * self.block_size + 1]
        return chunk[:-1], chunk[1:]


class ResumableLoader(DataLoader):
    """The training loader: shuffled by a seeded generator, and able to continue mid-epoch.

    Lightning keeps ``state_dict()`` in each checkpoint and hands it back through
    ``load_state_dict()`` on resume. The state is where training stands, as the
    trainer's fit loop counts it (``progress()``: epoch, batches taken in it, batches
    per epoch), not what this loader has handed out, which runs one batch ahead of
    training (Lightning prefetches). Resuming replays the earlier epochs through
    ``DataLoader`` itself, so the generator, and with it every later batch, is the one
    an uninterrupted run sees.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, progress: Callable[[], dict]):
        super().__init__(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(seed))
        self.progress = progress
        self.resume_at: dict | None = None

    def state_dict(self) -> dict:
        return self.progress()

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = state

    def __iter__(self):
        if self.resume_at is None:
            return super().__iter__()
        at, self.resume_at = self.resume_at, None
        epoch, taken, per_epoch = at["epoch"], at["batches"], at["per_epoch"]
        if taken >= per_epoch:  # the checkpoint closed its epoch
            epoch, taken = epoch + 1, 0
        for _ in range(epoch):
            self.replay_epoch(per_epoch)
        return islice(super().__iter__(), taken, None)

    def replay_epoch(self, per_epoch: int) -> None:
        """Draw an epoch from the generator as training did: ``per_epoch`` batches, to the
        end of the loader when training took them all (``trainer.limit_train_batches``)."""
        batches = super().__iter__()
        for _ in islice(batches, per_epoch):
            pass
        if per_epoch >= len(self):
            for _ in batches:
                pass


class SeededDataModule(pl.LightningDataModule):
    """The loaders of every run's data: training shuffled by a seeded generator that resumes
    mid-epoch, the held-out splits fixed. A subclass sets ``train_set``, ``val_set``,
    ``test_set`` (None when nothing is held out to test on), ``batch_size``, ``seed``,
    ``block_size`` (positions per example, for val/tokens) and ``fingerprint`` (a hash of
    the data, part of the base cache's key)."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset | None
    batch_size: int
    seed: int
    block_size: int
    fingerprint: str

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None and self.trainer.world_size > 1:
            # DDP: Lightning shards the data with its DistributedSampler, which it can put only
            # into a plain DataLoader; a resumed DDP run restarts its epoch (not bit-exact)
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(self.seed))
        return ResumableLoader(self.train_set, self.batch_size, self.seed, self.training_progress)

    def training_progress(self) -> dict:
        """Where training stands in the data, for a checkpoint: taken at the end of a batch."""
        trainer = self.trainer
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_idx + 1,
                "per_epoch": trainer.num_training_batches}

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


class TextDataModule(SeededDataModule):
    """Train, validation and test windows of one corpus. ``test_set`` is None when the corpus
    holds out no test part (``test_fraction=0``, a base's corpus)."""

    def __init__(self, corpus: str, block_size: int, batch_size: int = 16, val_fraction: float = 0.1,
                 test_fraction: float = 0.0, max_bytes: int | None = None, train_path: str | None = None,
                 val_path: str | None = None, test_path: str | None = None, tokenizer=None, seed: int = 0):
        super().__init__()
        self.tokenizer = tokenizer or ByteTokenizer()
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        splits = corpus_splits(corpus, max_bytes, val_fraction, test_fraction, train_path, val_path, test_path)
        self.fingerprint = digest(splits.train, splits.val)
        self.train_set = TokenWindows(self.encode(splits.train), block_size)
        self.val_set = TokenWindows(self.encode(splits.val), block_size)
        self.test_set = TokenWindows(self.encode(splits.test), block_size) if splits.test else None

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text), dtype=torch.long)

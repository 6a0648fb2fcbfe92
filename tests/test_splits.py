"""The held-out data in two disjoint parts: validation (chooses) and test (reports), at the
sizes the fractions say, never overlapping training or each other."""

from __future__ import annotations

import pytest
import torch

from loralab.data import TextDataModule, corpus_splits, pydoc_topics_text


def test_builtin_corpus_holds_out_validation_then_test_at_its_end():
    text = pydoc_topics_text()
    splits = corpus_splits("pydoc_topics", val_fraction=0.1, test_fraction=0.1)
    held_out = len(text) - int(len(text) * 0.8)  # the last 20 %, cut in half
    assert len(splits.train) == int(len(text) * 0.8)
    assert len(splits.val) == round(held_out / 2) and len(splits.test) == held_out - round(held_out / 2)
    # three consecutive, disjoint slices that together are the corpus
    assert splits.train + splits.val + splits.test == text
    assert text.index(splits.test, len(splits.train)) == len(splits.train) + len(splits.val)


def test_max_bytes_cuts_before_the_split_and_the_proportions_hold():
    splits = corpus_splits("pydoc_topics", max_bytes=1000, val_fraction=0.1, test_fraction=0.3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (600, 100, 300)
    assert splits.train + splits.val + splits.test == pydoc_topics_text()[:1000]


def test_a_base_corpus_without_test_fraction_keeps_its_split():
    splits = corpus_splits("python_stdlib", max_bytes=100_000, val_fraction=0.05)
    assert (len(splits.train), len(splits.val), splits.test) == (95_000, 5_000, "")


def test_own_files_take_test_path_or_split_the_validation_file(tmp_path):
    train, val, test = tmp_path / "train.txt", tmp_path / "val.txt", tmp_path / "test.txt"
    train.write_text("t" * 1000)
    val.write_text("v" * 300 + "w" * 300)
    test.write_text("x" * 200)
    given = corpus_splits("text", val_fraction=0.1, test_fraction=0.1, train_path=str(train), val_path=str(val),
                          test_path=str(test))
    assert given == ("t" * 1000, "v" * 300 + "w" * 300, "x" * 200)
    # no test_path: the validation file is cut val_fraction : test_fraction (here 1 : 2)
    cut = corpus_splits("text", val_fraction=0.1, test_fraction=0.2, train_path=str(train), val_path=str(val))
    assert cut == ("t" * 1000, "v" * 200, "v" * 100 + "w" * 300)
    # test_path alone: the train file's tail is validation only
    tail = corpus_splits("text", val_fraction=0.1, test_fraction=0.1, train_path=str(train), test_path=str(test))
    assert (len(tail.train), len(tail.val), tail.test) == (900, 100, "x" * 200)


def test_the_data_module_windows_come_from_three_consecutive_parts_of_the_tokens():
    # disjoint by position: the documentation repeats itself, so equal windows may still occur
    data = TextDataModule("pydoc_topics", block_size=64, val_fraction=0.1, test_fraction=0.1)
    ids = data.encode(pydoc_topics_text())
    assert torch.equal(torch.cat([data.train_set.ids, data.val_set.ids, data.test_set.ids]), ids)
    for split in (data.train_set, data.val_set, data.test_set):
        assert len(split) == (len(split.ids) - 1) // 64 > 0
        assert torch.equal(split[len(split) - 1][1][-1:], split.ids[len(split) * 64: len(split) * 64 + 1])


def test_digits_split_three_ways_fixed_across_seeds():
    pytest.importorskip("sklearn")
    from loralab.vision_data import DigitsDataModule

    data = DigitsDataModule("digits_5_9", val_fraction=0.2, test_fraction=0.2, seed=1)
    other_seed = DigitsDataModule("digits_5_9", val_fraction=0.2, test_fraction=0.2, seed=2)
    n = len(data.train_set) + len(data.val_set) + len(data.test_set)
    assert len(data.val_set) == len(data.test_set) == int(n * 0.2)
    images = [{tuple(x.flatten().tolist()) for x, _ in split} for split in (data.train_set, data.val_set,
                                                                            data.test_set)]
    assert sum(map(len, images)) <= n and not (images[1] & images[2])
    assert torch.equal(data.test_set.tensors[0], other_seed.test_set.tensors[0])

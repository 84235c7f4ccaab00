"""Slice cache and SliceDataset: bit-identical slices, no re-decoding, sampling, augmentation, workers."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from samadapt.data import AugmentConfig, Preprocessing, SliceDataset, VolumeSlices, readers
from samadapt.data.cache import cached_slices
from samadapt.data.manifest import Case
from samadapt.io import sha256_file

PREP = Preprocessing(image_size=32)


def _case(tmp_path, name="a", seed=0, small_class=True):
    rng = np.random.default_rng(seed)
    image = np.zeros((10, 24, 20), np.float32)
    image[2:8, 4:20, 3:17] = rng.uniform(50, 150, size=(6, 16, 14))
    label = np.zeros(image.shape, np.uint8)
    label[3:7, 8:16, 6:14] = 1
    if small_class:
        label[4, 10:12, 8:10] = 2  # a small structure on one slice only
    geometry = {"size": [20, 24, 10], "spacing": [1.0, 1.2, 2.0], "origin": [0.0, 0.0, 0.0],
                "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    readers.write_volume(image, geometry, tmp_path / f"{name}.nii.gz")
    readers.write_volume(label, geometry, tmp_path / f"{name}_seg.nii.gz")
    return Case(name, tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_seg.nii.gz", "MR", "train")


def test_cache_is_bit_identical_and_never_decodes_again(tmp_path):
    case = _case(tmp_path)
    direct = VolumeSlices(case.image, PREP, "MR", case.label)
    before = readers.decode_count()
    dataset = SliceDataset([case], PREP, cache_dir=tmp_path / "cache", empty_fraction=1.0, skip_empty=0.0)
    assert readers.decode_count() - before == 2  # image + label, once
    assert len(dataset) == 10
    for epoch in range(2):
        for item in DataLoader(dataset, batch_size=4):
            for image, label, index in zip(item["image"], item["label"], item["slice"]):
                expected = direct.images[index].astype(np.float16).astype(np.float32)
                assert np.array_equal(image[0].numpy(), expected)
                assert np.array_equal(label.numpy(), direct.labels[index])
    again = SliceDataset([case], PREP, cache_dir=tmp_path / "cache")  # new process/run: same entry
    again[0]
    assert readers.decode_count() - before == 2
    assert len(list((tmp_path / "cache" / "slices").iterdir())) == 1  # no temp folders left


def test_content_hash_is_remembered_and_follows_edits(tmp_path):
    case = _case(tmp_path)
    first = sha256_file(case.image, tmp_path)
    assert len(list((tmp_path / "hashes").iterdir())) == 1
    assert sha256_file(case.image, tmp_path) == first
    _case(tmp_path, seed=1)  # rewrite the same path with other voxels
    assert sha256_file(case.image, tmp_path) != first


def test_lost_rename_race_keeps_the_winner(tmp_path):
    from samadapt.data.cache import _build

    case = _case(tmp_path)
    entry = cached_slices(case, PREP, tmp_path / "cache")
    index_before = (entry.folder / "index.json").read_text(encoding="utf-8")
    _build(case, PREP, entry.folder, None)  # a slower process finishes the same entry: its rename loses
    assert (entry.folder / "index.json").read_text(encoding="utf-8") == index_before
    assert [p.name for p in (tmp_path / "cache" / "slices").iterdir()] == [entry.folder.name]


def test_empty_fraction_skip_empty_and_sampler(tmp_path):
    case = _case(tmp_path)
    labelled_only = SliceDataset([case], PREP, cache_dir=tmp_path / "c", empty_fraction=0.0)
    assert sorted(item["slice"] for item in labelled_only) == [3, 4, 5, 6]
    with_empty = SliceDataset([case], PREP, cache_dir=tmp_path / "c", empty_fraction=1.0, skip_empty=0.01)
    assert sorted(item["slice"] for item in with_empty) == [2, 3, 4, 5, 6, 7]  # blank slices 0,1,8,9 dropped
    draws = torch.multinomial(with_empty.sample_weights(), 3000, replacement=True,
                              generator=torch.Generator().manual_seed(0)).tolist()
    slices = [with_empty.items[i][1] for i in draws]
    share_small = np.mean([s == 4 for s in slices])
    assert share_small > 0.3  # the one slice with class 2 gets a class's share, not 1/6
    assert with_empty.num_classes == 3


def test_unlabeled_all_planes_and_augmentation(tmp_path):
    case = _case(tmp_path)
    ssl = SliceDataset([case], Preprocessing(image_size=32, plane="all"), cache_dir=tmp_path / "c",
                       labeled=False, skip_empty=0.0)
    assert len(ssl) == 10 + 24 + 20 and {item["plane"] for item in ssl} == {"axial", "coronal", "sagittal"}
    assert "label" not in ssl[0] and ssl[0]["image"].shape == (1, 32, 32)
    plain = SliceDataset([case], PREP, cache_dir=tmp_path / "c", empty_fraction=0.0)
    augmented = SliceDataset([case], PREP, cache_dir=tmp_path / "c", empty_fraction=0.0,
                             augment=AugmentConfig(prob=1.0, flip=True, rotate=20, zoom=0.2, gamma=0.5, intensity=0.1))
    a, b = plain[1], augmented[1]
    assert a["image"].shape == b["image"].shape and b["label"].dtype == torch.int64
    assert not torch.equal(a["image"], b["image"])
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert set(b["label"].unique().tolist()) <= {0, 1, 2}  # nearest-neighbour labels stay integers
    assert torch.equal(augmented[1]["image"], b["image"])  # fixed by (seed, epoch, item): resumable
    augmented.set_epoch(1)
    assert not torch.equal(augmented[1]["image"], b["image"])  # a new epoch draws new augmentations


def test_dataloader_with_two_workers(tmp_path):
    torch.set_num_threads(2)
    cases = [_case(tmp_path, "a"), _case(tmp_path, "b", seed=3, small_class=False)]
    dataset = SliceDataset(cases, PREP, cache_dir=tmp_path / "c", empty_fraction=1.0, skip_empty=0.0,
                           augment=AugmentConfig())
    batches = list(DataLoader(dataset, batch_size=5, num_workers=2))
    assert sum(len(b["case_id"]) for b in batches) == 20
    assert {c for b in batches for c in b["case_id"]} == {"a", "b"}


def test_labeled_dataset_needs_labels(tmp_path):
    case = _case(tmp_path)
    from dataclasses import replace

    from samadapt.errors import UserError

    with pytest.raises(UserError, match="cases a have no label"):
        SliceDataset([replace(case, label=None)], PREP, cache_dir=tmp_path / "c")

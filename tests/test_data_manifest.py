"""Manifests: formats, path resolution, validation reporting every problem at once."""

import json

import numpy as np
import pytest

from samadapt.data.manifest import cache_root, load_label_names, load_manifest, resolve_manifest
from samadapt.data.readers import write_volume
from samadapt.errors import UserError

GEOMETRY = {"size": [4, 4, 2], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
            "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}


def _volume(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(np.zeros((2, 4, 4), np.uint8), GEOMETRY, path)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_and_csv_resolve_relative_home_and_variables(tmp_path, monkeypatch):
    _volume(tmp_path / "data" / "a.nii.gz")
    _volume(tmp_path / "data" / "a_seg.nii.gz")
    _volume(tmp_path / "env" / "b.nii.gz")
    monkeypatch.setenv("MYDATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path))
    manifest = _jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "image": "data/a.nii.gz", "label": "data/a_seg.nii.gz", "modality": "mri", "split": "train"},
        {"image": "${MYDATA}/b.nii.gz", "label": "", "modality": "CT", "split": "test"},
        {"id": "c", "image": "~/data/a.nii.gz", "modality": "MR", "split": "val", "fold": 1},
    ])
    cases = load_manifest(manifest)
    assert [c.id for c in cases] == ["a", "b", "c"]
    assert cases[0].image == tmp_path / "data" / "a.nii.gz" and cases[0].modality == "MR"
    assert cases[1].image == tmp_path / "env" / "b.nii.gz" and cases[1].label is None
    assert cases[2].image == tmp_path / "data" / "a.nii.gz" and cases[2].fold == 1
    assert [c.id for c in load_manifest(manifest, split="test")] == ["b"]
    csv = tmp_path / "m.csv"
    csv.write_text("id,image,label,modality,split\na,data/a.nii.gz,data/a_seg.nii.gz,MR,train\n", encoding="utf-8")
    assert load_manifest(csv, require_labels=True)[0].label == tmp_path / "data" / "a_seg.nii.gz"


def test_all_problems_reported_at_once(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    manifest = _jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "image": "a.nii.gz", "modality": "MR", "split": "train"},
        {"id": "a", "image": "a.nii.gz", "modality": "MR", "split": "train"},
        {"id": "m", "image": "missing.nii.gz", "modality": "MR", "split": "train"},
        {"id": "p", "image": "a.nii.gz", "modality": "PET", "split": "holdout"},
        {"id": "l", "image": "", "label": "a.nii.gz", "modality": "MR", "split": "train"},
    ])
    with pytest.raises(UserError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert message.startswith(f"{manifest}: 5 problem(s)")
    assert "row 2: duplicate id 'a' (first in row 1)" in message
    assert "row 3: image " in message and "missing.nii.gz not found" in message
    assert "row 4: unknown modality 'PET'" in message and "row 4: unknown split 'holdout'" in message
    assert "row 5: label a.nii.gz without an image" in message
    assert "\n" not in message


def test_empty_manifest_missing_labels_and_empty_split(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty manifest"):
        load_manifest(empty)
    _volume(tmp_path / "a.nii.gz")
    manifest = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "image": "a.nii.gz", "modality": "MR", "split": "train"}])
    with pytest.raises(UserError, match="row 1: case 'a' has no label"):
        load_manifest(manifest, require_labels=True)
    with pytest.raises(UserError, match="no rows with split=val"):
        load_manifest(manifest, split="val")
    with pytest.raises(UserError, match="manifest not found"):
        resolve_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="unknown demo manifest"):
        resolve_manifest("demo:nope")


def test_folds_select_train_and_val(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    rows = [{"id": f"c{i}", "image": "a.nii.gz", "modality": "MR", "split": "train", "fold": i % 3} for i in range(6)]
    manifest = _jsonl(tmp_path / "m.jsonl", rows)
    assert [c.id for c in load_manifest(manifest, split="val", fold=1)] == ["c1", "c4"]
    assert len(load_manifest(manifest, split="train", fold=1)) == 4


def test_label_names_and_cache_variable(tmp_path, monkeypatch):
    manifest = tmp_path / "set.jsonl"
    (tmp_path / "set.labels.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}), encoding="utf-8")
    assert load_label_names(manifest) == {0: "background", 1: "liver", 2: "tumour"}
    (tmp_path / "labels.json").write_text(json.dumps({"0": "background", "1": "brain"}), encoding="utf-8")
    assert load_label_names(tmp_path / "other.jsonl") == {0: "background", 1: "brain"}
    assert load_label_names(tmp_path / "sub" / "x.jsonl") is None
    monkeypatch.setenv("SAMADAPT_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    _volume(tmp_path / "cache" / "demo" / "v.nii.gz")
    row = {"id": "v", "image": "${SAMADAPT_CACHE}/demo/v.nii.gz", "modality": "MR", "split": ""}
    assert load_manifest(_jsonl(tmp_path / "c.jsonl", [row]))[0].image == tmp_path / "cache" / "demo" / "v.nii.gz"

"""Manifests: formats, path resolution, validation reporting every problem at once."""

import json

import numpy as np
import pytest

from samadapt.data.manifest import cache_root, load_label_names, load_manifest, resolve_manifest
from samadapt.data.normalise import canonical_modality, normalise, require_modality
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
    labels = {"labels": {"background": 0, "liver": 1, "tumour": 2}}
    (tmp_path / "set.labels.json").write_text(json.dumps(labels), encoding="utf-8")
    assert load_label_names(manifest) == {0: "background", 1: "liver", 2: "tumour"}
    (tmp_path / "labels.json").write_text(json.dumps({"0": "background", "1": "brain"}), encoding="utf-8")
    assert load_label_names(tmp_path / "other.jsonl") == {0: "background", 1: "brain"}
    assert load_label_names(tmp_path / "sub" / "x.jsonl") is None
    monkeypatch.setenv("SAMADAPT_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    _volume(tmp_path / "cache" / "demo" / "v.nii.gz")
    row = {"id": "v", "image": "${SAMADAPT_CACHE}/demo/v.nii.gz", "modality": "MR", "split": ""}
    assert load_manifest(_jsonl(tmp_path / "c.jsonl", [row]))[0].image == tmp_path / "cache" / "demo" / "v.nii.gz"


def test_a_spreadsheet_manifest_with_a_byte_order_mark_just_works(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfid,image,label,modality,split\r\na,a.nii.gz,,ct,train\r\n")
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "image": "a.nii.gz"}).encode() + b"\n")
    (tmp_path / "m.labels.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"background": 0, "x": 1}).encode())
    [case] = load_manifest(resolve_manifest(tmp_path / "m.csv"))
    assert (case.id, case.image, case.modality, case.split) == ("a", tmp_path / "a.nii.gz", "CT", "train")
    assert [c.id for c in load_manifest(tmp_path / "m.jsonl")] == ["a"]
    assert load_label_names(tmp_path / "m.jsonl") == {0: "background", 1: "x"}


def test_a_manifest_in_another_encoding_is_one_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("id,image,label,modality,split\nmüller,a.nii.gz,,MR,\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"^{path}: not UTF-8 text \(byte 0xfc on line 2\) — save it as UTF-8$"):
        load_manifest(path)


def test_only_jsonl_and_csv_are_manifests(tmp_path):
    for name in ("m.txt", "m.json", "m.jsonl.bak"):
        _jsonl(tmp_path / name, [{"id": "a", "image": "a.nii.gz"}])
        for read in (resolve_manifest, load_manifest):
            with pytest.raises(UserError, match=rf"{name}: not a manifest file name — manifests end in \.jsonl or "):
                read(tmp_path / name)


def test_modality_is_one_rule_any_case(tmp_path):
    assert [canonical_modality(v) for v in ("ct", " Mr ", "mri", "CT", "XR", "", None)] == [
        "CT", "MR", "MR", "CT", None, None, None]
    assert require_modality("ct", "modality=") == "CT"
    with pytest.raises(UserError, match=r"^modality=: unknown modality 'XR' — use MR or CT \(any case; MRI = MR\)$"):
        require_modality("XR", "modality=")
    _volume(tmp_path / "a.nii.gz")
    rows = [{"id": "lower", "image": "a.nii.gz", "modality": "ct"}, {"id": "empty", "image": "a.nii.gz"},
            {"id": "xr", "image": "a.nii.gz", "modality": "XR"}]
    with pytest.raises(UserError, match=r"1 problem\(s\) — row 3: unknown modality 'XR' — use MR or CT"):
        load_manifest(_jsonl(tmp_path / "m.jsonl", rows))
    cases = load_manifest(_jsonl(tmp_path / "ok.jsonl", rows[:2]))
    assert [c.modality for c in cases] == ["CT", "MR"]
    # the normalisation itself follows the rule: "ct" is windowed as CT, an unknown modality is refused
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0], np.float32)
    np.testing.assert_allclose(normalise(hu, "ct"), normalise(hu, "CT"))
    with pytest.raises(UserError, match="unknown modality 'XR'"):
        normalise(hu, "XR")

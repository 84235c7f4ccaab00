"""``samadapt data import`` on small nnU-Net v2, MSD and plain folders the tests write."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.cli import main
from samadapt.data.manifest import load_label_names, load_manifest
from samadapt.data.readers import write_volume

GEOMETRY = {"size": [6, 5, 4], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
            "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}


def _vol(path, value=1.0, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(np.full((4, 5, 6), value, dtype), GEOMETRY, path)


def _nnunet(root, n_train=5):
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": n_train, "file_ending": ".nii.gz"}))
    for i in range(n_train):
        for channel in (0, 1):
            _vol(root / "imagesTr" / f"liver_{i:03d}_{channel:04d}.nii.gz", value=channel)
        _vol(root / "labelsTr" / f"liver_{i:03d}.nii.gz", value=i % 3, dtype=np.uint8)
    _vol(root / "imagesTs" / "liver_900_0000.nii.gz")
    _vol(root / "imagesTs" / "liver_900_0001.nii.gz")
    return root


def test_nnunet_v2_import_with_val_split(tmp_path, capsys):
    root = _nnunet(tmp_path / "Dataset001_Liver")
    out = tmp_path / "manifests" / "liver.jsonl"
    assert main(["data", "import", str(root), f"out={out}", "--val-fraction", "0.4", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "nnunet" and summary["splits"] == {"train": 3, "val": 2, "test": 1}
    cases = load_manifest(out)
    assert all(c.modality == "CT" and c.image.name.endswith("_0000.nii.gz") for c in cases)
    train = [c for c in cases if c.split in ("train", "val")]
    assert all(c.label == root / "labelsTr" / f"{c.id}.nii.gz" for c in train)
    assert [c.id for c in cases if c.split == "test"] == ["liver_900"] and cases[-1].label is None
    assert load_label_names(out) == {0: "background", 1: "liver", 2: "tumour"}
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert not first["image"].startswith("/")  # relative to the manifest
    # same seed → same split; other seed → (here) another split
    again = tmp_path / "again.jsonl"
    main(["data", "import", str(root), f"out={again}", "--val-fraction", "0.4", "--seed", "3"])
    assert [(c.id, c.split) for c in load_manifest(again)] == [(c.id, c.split) for c in cases]


def test_nnunet_folds_and_channel(tmp_path):
    root = _nnunet(tmp_path / "Dataset002", n_train=6)
    out = tmp_path / "folds.jsonl"
    assert main(["data", "import", str(root), f"out={out}", "--folds", "3", "--channel", "1"]) == 0
    cases = load_manifest(out)
    assert sorted(c.fold for c in cases if c.split == "train") == [0, 0, 1, 1, 2, 2]
    assert all(c.image.name.endswith("_0001.nii.gz") and c.modality == "MR" for c in cases)
    assert len(load_manifest(out, split="val", fold=2)) == 2


def test_msd_import(tmp_path):
    root = tmp_path / "Task04_Hippocampus"
    _vol(root / "imagesTr" / "hippocampus_001.nii.gz")
    _vol(root / "labelsTr" / "hippocampus_001.nii.gz", 1, np.uint8)
    _vol(root / "imagesTr" / "hippocampus_002.nii.gz")
    _vol(root / "labelsTr" / "hippocampus_002.nii.gz", 2, np.uint8)
    _vol(root / "imagesTs" / "hippocampus_100.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": [{"image": f"./imagesTr/hippocampus_00{i}.nii.gz", "label": f"./labelsTr/hippocampus_00{i}.nii.gz"}
                     for i in (1, 2)],
        "test": ["./imagesTs/hippocampus_100.nii.gz"]}))
    out = tmp_path / "hippo.jsonl"
    assert main(["data", "import", str(root), f"out={out}"]) == 0
    cases = load_manifest(out)
    assert [(c.id, c.split, c.label is not None) for c in cases] == [
        ("hippocampus_001", "train", True), ("hippocampus_002", "train", True), ("hippocampus_100", "test", False)]
    assert load_label_names(out)[2] == "Posterior"


def test_plain_folder_with_dicom_is_unlabeled(tmp_path, capsys):
    root = tmp_path / "scans"
    _vol(root / "a" / "t1.nii.gz")
    _vol(root / "b.mha")
    series = root / "dicom"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for uid in ("1.2.3.4", "1.2.3.5"):  # two series in one folder → one row each
        for z in range(2):
            image = sitk.GetImageFromArray(np.full((4, 4), z, np.int16))
            for tag, value in {"0020|000e": uid, "0008|0018": f"{uid}.{z}", "0020|0032": f"0\\0\\{z}",
                               "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(series / f"{uid}_{z}.dcm"))
            writer.Execute(image)
    out = tmp_path / "pool.csv.jsonl"
    assert main(["data", "import", str(root), f"out={out}", "--modality", "CT"]) == 0
    cases = load_manifest(out)
    assert sorted(c.id for c in cases) == ["a_t1", "b", "dicom_1.2.3.4", "dicom_1.2.3.5"]
    assert {c.series_uid for c in cases} == {None, "1.2.3.4", "1.2.3.5"}
    assert all(c.label is None and c.modality == "CT" for c in cases)
    assert main(["data", "check", str(out)]) == 0
    assert "4 cases ok" in capsys.readouterr().out
    # The series folder itself given as the folder to import
    only = tmp_path / "series.jsonl"
    assert main(["data", "import", str(series), f"out={only}"]) == 0
    assert sorted((c.id, c.series_uid) for c in load_manifest(only)) == [
        ("dicom_1.2.3.4", "1.2.3.4"), ("dicom_1.2.3.5", "1.2.3.5")]


def test_import_and_check_errors(tmp_path, capsys):
    assert main(["data", "import", str(tmp_path / "nothing"), "out=x.jsonl"]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "import", str(tmp_path / "empty"), f"out={tmp_path / 'x.jsonl'}"]) == 2
    assert "no images found" in capsys.readouterr().err
    root = _nnunet(tmp_path / "Dataset003", n_train=3)
    out = tmp_path / "small.jsonl"
    main(["data", "import", str(root), f"out={out}"])
    assert main(["data", "check", str(out), "num_classes=2"]) == 2  # liver_002 has label value 2
    assert "liver_002.nii.gz: values {2} but num_classes=2 — set num_classes=3" in capsys.readouterr().err
    assert main(["data", "check", str(out), "num_classes=3"]) == 0
    with pytest.raises(SystemExit):
        main(["data", "import", str(root)])  # out= missing


def test_import_writes_real_csv_for_a_csv_out(tmp_path):
    root = _nnunet(tmp_path / "Dataset004", n_train=4)
    jsonl, table = tmp_path / "liver.jsonl", tmp_path / "liver.csv"
    for out in (jsonl, table):
        assert main(["data", "import", str(root), f"out={out}", "--folds", "2"]) == 0
    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id", "image", "label", "modality", "split", "fold"]
    assert (rows[0]["id"], rows[0]["image"]) == ("liver_000", "Dataset004/imagesTr/liver_000_0000.nii.gz")
    assert load_manifest(table) == load_manifest(jsonl)
    assert load_label_names(table) == {0: "background", 1: "liver", 2: "tumour"}


def test_import_refuses_an_out_that_is_no_manifest_file_before_writing(tmp_path, capsys):
    root = _nnunet(tmp_path / "Dataset005", n_train=2)
    folder = tmp_path / "runs"
    folder.mkdir()
    for out, says in ((folder, f"out={folder}: is a folder — give a manifest file name, e.g. out={folder}/manifest"),
                      (tmp_path / "m.txt", "a manifest must end in .jsonl or .csv")):
        assert main(["data", "import", str(root), f"out={out}"]) == 2
        assert says in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["Dataset005", "runs"]


@pytest.mark.parametrize("meta, says", [
    ({"training": [{"image": "./imagesTr/a.nii.gz"}]}, 'training entry 1 has no "label" path'),
    ({"training": [{"image": "./imagesTr/a.nii.gz", "label": 3}]}, 'training entry 1 has no "label" path'),
    ({"training": ["./imagesTr/a.nii.gz"]}, 'training entry 1 is "./imagesTr/a.nii.gz", not {"image": ..., "label"'),
    ({"training": {"image": "./imagesTr/a.nii.gz"}}, '"training" must be a list'),
    ({"training": [], "test": [{"label": "x"}]}, 'test entry 1 has no "image" path'),
    ({"training": [], "labels": ["background", "liver"]}, "labels must be a mapping"),
    ({"training": [], "labels": {"0": "background", "one": "liver"}}, "'one': 'liver' is not an integer class id"),
    ({"channel_names": {"0": "CT"}, "labels": ["background", "liver"]}, "labels must be a mapping"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": [1, 2]}}, "region-based labels"),
    ({"channel_names": ["CT"], "labels": {"background": 0}}, "channel_names must be a mapping"),
    ({"channel_names": {"0": "CT"}, "file_ending": 7}, "file_ending 7 must be a file suffix"),
])
def test_broken_dataset_json_is_one_line_and_writes_nothing(tmp_path, capsys, meta, says):
    root = tmp_path / "Task01"
    _vol(root / "imagesTr" / "a.nii.gz")
    _vol(root / "imagesTr" / "a_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    out = tmp_path / "m.jsonl"
    assert main(["data", "import", str(root), f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root / 'dataset.json'}: ") and says in err and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "m.labels.json").exists()


def test_import_modality_option_any_case(tmp_path, capsys):
    _vol(tmp_path / "scans" / "a.nii.gz")
    assert main(["data", "import", str(tmp_path / "scans"), f"out={tmp_path / 'm.jsonl'}", "--modality", "ct"]) == 0
    assert load_manifest(tmp_path / "m.jsonl")[0].modality == "CT"
    assert main(["data", "import", str(tmp_path / "scans"), f"out={tmp_path / 'x.jsonl'}", "--modality", "XR"]) == 2
    assert "--modality: unknown modality 'XR' — use MR or CT" in capsys.readouterr().err

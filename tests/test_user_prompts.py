"""predict prompts=FILE: parsing rules, voxel and mm boxes on real and oblique geometry, and the CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import assert_one_line_error, run_cli
from samadapt.data import Preprocessing, VolumeSlices
from samadapt.errors import UserError
from samadapt.propagation import boxes_from_labels
from samadapt.user_prompts import UserBox, box_volume, canvas_boxes, read_prompts


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


GOOD = {"case": "a", "class": 1, "box": [1, 2, 3, 4, 5, 6]}


@pytest.mark.parametrize("name, content, says", [
    ("p.json", "{nope", "not valid JSON"),
    ("p.json", {"prompts": "x"}, "expected a list of prompt objects"),
    ("p.json", [], "no prompts inside"),
    ("p.json", [{**GOOD, "case": ""}], "prompt 1: no case"),
    ("p.json", [{**GOOD, "class": "liver"}], "class 'liver' is not a number or a class name (brain)"),
    ("p.json", [{**GOOD, "class": 2}], "class 2 — the model segments classes 1..1"),
    ("p.json", [{**GOOD, "box": [1, 2, 3]}], "box must be 6 finite numbers"),
    ("p.json", [{**GOOD, "box": [1, 2, 3, 4, 5, "x"]}], "box must be 6 numbers"),
    ("p.json", [{**GOOD, "box": [1.5, 2, 3, 4, 5, 6]}], "whole numbers — use box_mm"),
    ("p.json", [{**GOOD, "box": [9, 2, 3, 4, 5, 6]}], "inside out"),
    ("p.json", [{**GOOD, "box_mm": [1, 2, 3, 4, 5, 6]}], "exactly one of box (voxel indices) or box_mm"),
    ("p.json", [GOOD, GOOD], "case 'a' class 1 has a box already"),
    ("p.csv", "case,class,x_min\na,1,2\n", "CSV lacks the column(s) y_min"),
    ("p.csv", "case,class,x_min,y_min,z_min,x_max,y_max,z_max,unit\na,1,0,0,0,1,1,1,inch\n", "unit='inch'"),
])
def test_bad_prompts_files_are_one_line_errors_naming_the_file(tmp_path, name, content, says):
    path = write(tmp_path, name, content)
    with pytest.raises(UserError) as error:
        read_prompts(path, {1: "brain"}, num_classes=2)
    assert str(path) in str(error.value) and says in str(error.value)


def test_csv_and_json_read_alike_and_names_resolve(tmp_path):
    csv = write(tmp_path, "p.csv", "case,class,x_min,y_min,z_min,x_max,y_max,z_max,unit\n"
                                   "a,brain,1,2,3,4,5,6,voxel\nb,1,0.5,0,0,10,10,10,mm\n")
    mm_row = {"case": "b", "class": 1, "box_mm": [0.5, 0, 0, 10, 10, 10]}
    from_json = read_prompts(write(tmp_path, "p.json", [GOOD, mm_row]), None, 2)
    assert read_prompts(csv, {1: "Brain"}, 2) == from_json
    assert from_json["a"] == [UserBox("a", 1, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), "voxel")]


def oblique_geometry() -> dict:
    image = sitk.Image(20, 30, 12, sitk.sitkUInt8)
    image.SetSpacing((0.8, 1.1, 3.0))
    image.SetOrigin((-12.0, 40.0, 7.5))
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, -1))
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}, image


def test_a_box_in_mm_covers_the_same_voxels_as_in_indices_on_an_oblique_image():
    geometry, image = oblique_geometry()
    low, high = (3, 4, 2), (9, 20, 7)
    corners = [image.TransformIndexToPhysicalPoint(c) for c in (low, high)]
    # the index box's two opposite corners in mm span a box whose index hull is the same box
    mm_low, mm_high = np.minimum(*corners), np.maximum(*corners)
    by_index = box_volume([UserBox("a", 1, low, high, "voxel")], geometry, "x")
    assert by_index[2:8, 4:21, 3:10].all() and by_index.sum() == 6 * 17 * 7
    by_mm = box_volume([UserBox("a", 1, tuple(mm_low), tuple(mm_high), "mm")], geometry, "x")
    assert (by_mm[by_index > 0] == 1).all()  # the mm hull holds the index box (rotation widens it)
    with pytest.raises(UserError, match="reaches outside the image"):
        box_volume([UserBox("a", 1, (0, 0, 0), (20, 29, 11), "voxel")], geometry, "scan.nii.gz")


def test_the_references_own_box_lands_on_the_canvas_where_the_reference_does(small_manifests):
    row = json.loads(small_manifests["brain"].read_text(encoding="utf-8").splitlines()[2])
    slices = VolumeSlices(row["image"], Preprocessing(image_size=256), "MR", label=row["label"])
    z, y, x = np.nonzero(slices.reference)
    box = UserBox("colin27_test", 1, (x.min(), y.min(), z.min()), (x.max(), y.max(), z.max()), "voxel")
    (drawn,) = canvas_boxes(slices, [box], 2, "colin27")
    (reference,) = boxes_from_labels(slices.labels, 2)
    assert (drawn.first, drawn.last) == (reference.first, reference.last)
    np.testing.assert_allclose(drawn.xyxy, reference.xyxy, atol=1.0)  # nearest-neighbour edges: within a pixel


def test_predict_with_a_prompts_file_writes_masks_in_the_input_geometry_only_inside_the_box(
        small_manifests, tiny_checkpoint, tmp_path):
    row = json.loads(small_manifests["brain"].read_text(encoding="utf-8").splitlines()[2])
    image = nib.load(row["image"])
    x, y, z = image.shape  # nibabel's index order is ITK's (i, j, k)
    box = [x // 4, y // 4, z // 2 - 3, 3 * x // 4, 3 * y // 4, z // 2 + 3]
    prompts = write(tmp_path, "prompts.json", [{"case": "colin27", "class": 1, "box": box}])
    common = [f"model={tiny_checkpoint}", "arch=vit_tiny", "image_size=256", f"input={row['image']}"]
    run_cli("predict", *common, f"prompts={prompts}", f"out={tmp_path / 'masks'}")
    mask = nib.load(tmp_path / "masks" / "colin27.nii.gz")
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    data = np.asarray(mask.dataobj)
    outside = np.ones(image.shape, bool)
    outside[:, :, box[2]:box[5] + 1] = False
    assert not data[outside].any()  # axial slices beyond the box's z range stay background

    unknown = write(tmp_path, "unknown.json", [{"case": "nobody", "class": 1, "box": box}])
    assert_one_line_error(run_cli("predict", *common, f"prompts={unknown}", f"out={tmp_path / 'm2'}", expect=None,
                                  in_process=True), "unknown.json", "case 'nobody' is not among the inputs")
    assert_one_line_error(run_cli("predict", *common, f"out={tmp_path / 'm3'}", expect=None, in_process=True),
                          "segments only with prompts", "prompts=FILE")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()

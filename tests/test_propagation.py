"""The 3-D box protocol: slice order, tightening from the neighbour, fallback to the box, nothing outside it.

An oracle model (its "embedding" is the object mask; it predicts the object inside the prompted box) makes
every expected mask computable by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samadapt.propagation import Box3D, boxes_from_labels, grown_box, propagate_boxes, walk

S = 256


class OracleInBox:
    """Predicts exactly the object pixels inside the prompted box: logits +10 there, -10 elsewhere."""

    def __init__(self, num_classes: int = 2):
        self.num_classes, self.training, self.encoded, self.prompts = num_classes, False, [], []

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # B x 1 x S x S
        self.encoded.append(images.shape[0])
        return images

    def decode(self, embeddings: torch.Tensor, prompts) -> torch.Tensor:
        logits = torch.full((1, self.num_classes - 1, S, S), -10.0)
        for channel in torch.nonzero(prompts.present[0]).flatten().tolist():
            x0, y0, x1, y1 = (int(v) for v in prompts.boxes[0, channel])
            self.prompts.append((x0, y0, x1, y1))
            inside = torch.zeros(S, S, dtype=torch.bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            logits[0, channel] = torch.where(inside & (embeddings[0, 0] == channel + 1), 10.0, -10.0)
        return logits

    def predict_labels(self, logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        logits = logits.masked_fill(~present[..., None, None], -1e4)
        best, index = logits.max(1)
        return torch.where(best > 0, index + 1, 0)


class Stack(SimpleNamespace):
    def __len__(self) -> int:
        return len(self.labels)


def make_stack(labels: np.ndarray) -> Stack:
    return Stack(prep=SimpleNamespace(image_size=S), labels=labels,
                 image_slices=lambda start, stop: labels[start:stop].astype(np.float32))


def disc(radius: int, centre=(128, 128)) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_walk_goes_from_the_middle_up_then_down_each_slice_once():
    order = walk(Box3D(1, 2, 7, (0, 0, 1, 1)))
    assert order == [(4, None), (5, 4), (6, 5), (7, 6), (3, 4), (2, 3)]


def test_grown_box_is_clipped_to_the_canvas_and_none_when_empty():
    mask = torch.zeros(S, S, dtype=torch.bool)
    assert grown_box(mask, 3) is None
    mask[0:5, 250:256] = True
    assert grown_box(mask, 3) == (247.0, 0.0, 255.0, 7.0)


def test_slowly_growing_object_is_followed_exactly_and_only_covered_slices_are_encoded():
    labels = np.zeros((12, S, S), np.int64)
    for z, radius in zip(range(3, 10), (4, 6, 8, 10, 12, 14, 16)):  # +2 px per slice, within the 3-px margin
        labels[z][disc(radius)] = 1
    model = OracleInBox()
    boxes = boxes_from_labels(labels, 2)
    assert boxes == [Box3D(1, 3, 9, (112.0, 112.0, 144.0, 144.0))]
    predicted = propagate_boxes(model, make_stack(labels), boxes, batch_size=4)
    np.testing.assert_array_equal(predicted, labels)
    assert sum(model.encoded) == 7  # slices 3..9 only; the rest are background without an encoder pass
    # the middle slice (6, radius 10) got the 3-D box; its neighbour 7 the grown box of slice 6's disc
    assert model.prompts[0] == (112, 112, 144, 144) and model.prompts[1] == (115, 115, 141, 141)


def test_an_object_growing_faster_than_the_margin_is_cut_by_the_tightened_box():
    labels = np.zeros((5, S, S), np.int64)
    for z, radius in zip(range(5), (30, 30, 30, 40, 50)):  # +10 px per slice above the middle (z = 2)
        labels[z][disc(radius)] = 1
    predicted = propagate_boxes(OracleInBox(), make_stack(labels), boxes_from_labels(labels, 2), batch_size=8)
    np.testing.assert_array_equal(predicted[:3], labels[:3])
    assert predicted[3].sum() < labels[3].sum() and predicted[3].any()  # clipped to slice 2's box + 3 px
    ys, xs = np.nonzero(predicted[3])
    assert xs.min() == 128 - 33 and xs.max() == 128 + 33


def test_an_empty_neighbour_falls_back_to_the_3d_box():
    labels = np.zeros((10, S, S), np.int64)
    for z in (2, 3, 4, 7, 8, 9):  # a gap at 5-6; the 3-D box's middle (5) is empty
        labels[z][disc(10)] = 1
    predicted = propagate_boxes(OracleInBox(), make_stack(labels), boxes_from_labels(labels, 2), batch_size=8)
    np.testing.assert_array_equal(predicted, labels)


def test_a_user_box_shorter_than_the_object_leaves_the_other_slices_background():
    labels = np.zeros((10, S, S), np.int64)
    labels[1:9][:, disc(20)] = 1
    user_box = Box3D(1, 4, 6, (100.0, 100.0, 156.0, 156.0))
    predicted = propagate_boxes(OracleInBox(), make_stack(labels), [user_box], batch_size=8)
    assert predicted[4:7].any(axis=(1, 2)).all()
    assert not predicted[:4].any() and not predicted[7:].any()


@pytest.mark.parametrize("absent", [True, False])
def test_each_class_gets_its_own_box_and_an_absent_class_none(absent):
    labels = np.zeros((6, S, S), np.int64)
    labels[1:4][:, disc(10, (60, 60))] = 1
    if not absent:
        labels[2:6][:, disc(15, (180, 180))] = 2
    model = OracleInBox(num_classes=3)
    boxes = boxes_from_labels(labels, 3)
    assert [box.label for box in boxes] == ([1] if absent else [1, 2])
    predicted = propagate_boxes(model, make_stack(labels), boxes, batch_size=8)
    np.testing.assert_array_equal(predicted, labels)


def test_evaluate_with_one_3d_box_per_case_through_the_cli(small_manifests, tiny_checkpoint, tmp_path):
    from conftest import assert_one_line_error, record_of, run_cli

    common = [f"model={tiny_checkpoint}", "arch=vit_tiny", "image_size=256", "prompt=box",
              f"data={small_manifests['brain']}", "overlays=false", f"cache_dir={tmp_path / 'cache'}"]
    run_cli("evaluate", *common, "box_protocol=volume", "embedding_cache=true", f"out={tmp_path / 'volume'}")
    record = record_of(tmp_path / "volume")
    assert "one 3-D reference box per case and class" in record["metrics"]["prompt_protocol"]
    assert any((tmp_path / "cache" / "embeddings" / "volumes").glob("*/*.npy"))
    points = run_cli("evaluate", *common[:3], "prompt=point", "box_protocol=volume", *common[4:],
                        f"out={tmp_path / 'auto'}", expect=None, in_process=True)
    assert_one_line_error(points, "box_protocol=volume", "set prompt=box, not prompt=point")

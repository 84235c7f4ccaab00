"""Box/point prompts from hand-made label maps."""

import torch
from scipy import ndimage

from samadapt.models.prompts import Prompts, boxes_from_labels, points_from_labels, prompts_from_labels


def hand_made_labels() -> torch.Tensor:
    """2 x 64 x 64, K = 4: slice 0 holds class 1 (rectangle) and class 2 (L shape); slice 1 only class 3."""
    labels = torch.zeros(2, 64, 64, dtype=torch.int64)
    labels[0, 10:21, 30:51] = 1  # rows 10..20, columns 30..50
    labels[0, 40:60, 5:8] = 2  # vertical bar of the L: rows 40..59, columns 5..7
    labels[0, 57:60, 5:25] = 2  # horizontal bar: rows 57..59, columns 5..24
    labels[1, 0:64, 60:64] = 3  # touches the image border
    return labels


def test_boxes_without_jitter_are_the_mask_extent_in_xy_pixels():
    boxes, present = boxes_from_labels(hand_made_labels(), num_classes=4)
    assert boxes.shape == (2, 3, 4) and present.shape == (2, 3)
    assert present.tolist() == [[True, True, False], [False, False, True]]
    assert boxes[0, 0].tolist() == [30, 10, 50, 20]  # x_min, y_min, x_max, y_max (inclusive)
    assert boxes[0, 1].tolist() == [5, 40, 24, 59]
    assert boxes[1, 2].tolist() == [60, 0, 63, 63]
    assert boxes[0, 2].tolist() == [0, 0, 0, 0] and boxes[1, 0].tolist() == [0, 0, 0, 0]  # empty → no box


def test_box_jitter_is_seeded_bounded_by_the_side_and_clipped():
    labels = hand_made_labels()
    exact, _ = boxes_from_labels(labels, 4)
    jittered, present = boxes_from_labels(labels, 4, jitter=0.2, rng=torch.Generator().manual_seed(3))
    again, _ = boxes_from_labels(labels, 4, jitter=0.2, rng=torch.Generator().manual_seed(3))
    assert torch.equal(jittered, again)
    assert not torch.equal(jittered[present], exact[present])
    sides = (exact[..., 2:] - exact[..., :2] + 1).repeat(1, 1, 2)
    assert ((jittered - exact).abs() <= 0.2 * sides + 1e-4)[present].all()
    assert (jittered >= 0).all() and (jittered <= 63).all()
    assert (jittered[..., :2] <= jittered[..., 2:]).all()


def test_points_fall_inside_positives_and_outside_negatives():
    labels = hand_made_labels()
    coords, point_labels, present = points_from_labels(
        labels, 4, num_positive=3, num_negative=2, rng=torch.Generator().manual_seed(0)
    )
    assert coords.shape == (2, 3, 5, 2) and point_labels.shape == (2, 3, 5)
    assert present.tolist() == [[True, True, False], [False, False, True]]
    for b, k in present.nonzero().tolist():
        assert point_labels[b, k].tolist() == [1, 1, 1, 0, 0]
        x, y = coords[b, k].long().unbind(-1)
        assert (coords[b, k] == coords[b, k].round()).all()
        hit = labels[b, y, x] == k + 1  # (x, y) = (column, row)
        assert hit[:3].all() and not hit[3:].any()
    assert (point_labels[~present] == -1).all()  # empty class: only padding


def test_negatives_stay_near_the_object_and_pad_when_the_class_fills_the_image():
    labels = torch.zeros(1, 64, 64, dtype=torch.int64)
    labels[0, 30:34, 30:34] = 1  # 4 x 4 box → negatives within rows/columns 26..37
    coords, point_labels, _ = points_from_labels(labels, 2, 1, 20, rng=torch.Generator().manual_seed(1))
    negatives = coords[0, 0, 1:]
    assert (negatives >= 26).all() and (negatives <= 37).all()
    full = torch.ones(1, 16, 16, dtype=torch.int64)
    _, point_labels, present = points_from_labels(full, 2, 2, 2, rng=torch.Generator().manual_seed(1))
    assert present.all() and point_labels[0, 0].tolist() == [1, 1, -1, -1]


def test_positive_points_prefer_the_interior():
    labels = torch.zeros(1, 64, 64, dtype=torch.int64)
    labels[0, 8:56, 8:56] = 1
    coords, _, _ = points_from_labels(labels, 2, num_positive=300, rng=torch.Generator().manual_seed(2))
    depth = torch.from_numpy(ndimage.distance_transform_edt(labels[0].numpy()))
    x, y = coords[0, 0].long().unbind(-1)
    assert depth[y, x].mean() > 1.2 * depth[labels[0] == 1].mean()


def test_prompts_from_labels_dispatches_on_the_mode():
    labels = hand_made_labels()
    assert prompts_from_labels("none", labels, 4) is None
    box = prompts_from_labels("box", labels, 4, box_jitter=0.0)
    assert isinstance(box, Prompts) and box.point_coords is None
    assert torch.equal(box.boxes, boxes_from_labels(labels, 4)[0])
    point = prompts_from_labels("point", labels, 4, torch.Generator().manual_seed(0), num_positive=2)
    assert point.boxes is None and point.point_coords.shape == (2, 3, 2, 2)
    assert torch.equal(point.to("cpu").present, point.present)

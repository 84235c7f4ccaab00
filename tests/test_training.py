"""The one training loop (samadapt.training): the lr schedule and the data order by hand, ``Trainer.fit`` on a
toy model (it trains, logs, saves and resumes bit-identically) and non-finite training stopped with one
error naming the step — in process, plus one run of the real ``samadapt finetune``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, run_cli
from samadapt.errors import UserError
from samadapt.keys import TrainKeys
from samadapt.training import EpochSampler, Trainer, lr_factor, make_accelerator

# ---- lr schedule ----------------------------------------------------------------------------------------


def test_lr_factor_warms_up_linearly_then_decays_by_a_cosine_to_zero():
    # 4 warm-up steps of 10: (step + 1) / 4, then 0.5 * (1 + cos(pi * (step - 4) / 6)).
    assert [lr_factor(step, 10, 4) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == 1.0  # the cosine starts at its top
    assert lr_factor(7, 10, 4) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(9, 10, 4) == pytest.approx(0.5 * (1 - math.sqrt(3) / 2))  # cos(5 pi / 6)
    assert lr_factor(10, 10, 4) == pytest.approx(0.0, abs=1e-12)  # the end of the cosine
    assert lr_factor(12, 10, 4) == pytest.approx(0.0, abs=1e-12)  # and it stays there
    assert lr_factor(0, 10, 0) == 1.0  # no warm-up: the first step runs at the peak


# ---- data order -----------------------------------------------------------------------------------------


def order(seed: int, epoch: int, weights: torch.Tensor | None = None, num_items: int = 20) -> list[int]:
    sampler = EpochSampler(num_items, seed, weights)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_sampler_order_is_a_pure_function_of_seed_and_epoch():
    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(20))  # without weights: a permutation
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)
    # Iterating epoch 0 first changes nothing about epoch 1 (a resumed run starts at any epoch).
    sampler = EpochSampler(20, 0)
    list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == order(0, 1)
    assert len(sampler) == 20


def test_weighted_epoch_sampler_draws_reproducibly_and_only_weighted_items():
    weights = torch.tensor([0.0, 0.0] + [1.0] * 8)
    drawn = order(3, 2, weights, num_items=10)
    assert drawn == order(3, 2, weights, num_items=10) and len(drawn) == 10
    assert set(drawn) <= set(range(2, 10))  # with replacement, never a zero-weight item
    assert drawn != order(3, 3, weights, num_items=10)


# ---- Trainer.fit on a toy model -------------------------------------------------------------------------


class Regression(torch.utils.data.Dataset):
    """8 items ``{"x": 4 floats, "y": float}`` of a noiseless linear target (``nan_labels``: every y is NaN)."""

    def __init__(self, nan_labels: bool = False):
        self.x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        self.y = self.x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 1.0
        if nan_labels:
            self.y[:] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.y[index]}


def squared_error(model, batch):
    """A ``LossFn``: mean squared error, and a lazily computed mean absolute error for the metrics rows."""
    error = model(batch["x"]).squeeze(-1) - batch["y"]
    return (error**2).mean(), lambda: {"mae": float(error.detach().abs().mean())}


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    # Dropout draws from the global RNG: a resumed run only matches when the loop re-seeds it identically.
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))


def train_keys(**overrides) -> TrainKeys:
    # Built directly, not through samadapt.config.build: that refuses lr=inf before a Trainer could see it.
    keys = {"steps": 3, "lr": 0.05, "batch_size": 2, "warmup_steps": 0, "log_every": 1, "save_every": 100,
            "tensorboard": False, "seed": 0, **overrides}
    return TrainKeys(**keys)


def fit(out: Path, model: nn.Module | None = None, dataset=None, after_step=None, **overrides):
    """(model, TrainResult) of one ``Trainer.fit`` into ``out``."""
    keys = train_keys(**overrides)
    model = model or toy_model()
    result = Trainer(make_accelerator(keys), keys, out).fit(model, dataset or Regression(), squared_error,
                                                            after_step=after_step)
    return model, result


def full_data_loss(model: nn.Module) -> float:
    data = Regression()
    model.eval()
    with torch.no_grad():
        return float(((model(data.x).squeeze(-1) - data.y) ** 2).mean())


def test_fit_trains_logs_every_step_and_writes_metrics_csv(tmp_path):
    before_model = toy_model()
    before = {name: tensor.clone() for name, tensor in before_model.state_dict().items()}
    before_loss = full_data_loss(before_model)
    model, result = fit(tmp_path)
    assert any(not torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert full_data_loss(model) < before_loss
    assert result.steps == 3 and result.resumed_from is None
    history = result.history
    assert [row["step"] for row in history] == [1, 2, 3]
    assert list(history[0]) == ["step", "loss", "lr", "images_per_s", "mae"]
    # Cosine over 3 steps without warm-up: lr x 1, x 0.5 (1 + cos(pi / 3)) = 0.75, x 0.5 (1 + cos(2 pi / 3)) = 0.25.
    assert [row["lr"] for row in history] == pytest.approx([0.05, 0.0375, 0.0125])
    assert result.final_loss == pytest.approx(history[-1]["loss"], abs=1e-6)
    with open(tmp_path / "metrics.csv", newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert [{k: float(v) for k, v in row.items()} for row in written] == \
        [{k: float(v) for k, v in row.items()} for row in history]
    assert not (tmp_path / "state").exists()  # save_every=100: no state in a 3-step run


class Killed(Exception):
    pass


class CrashAt:
    """``after_step`` that raises at one step, after the states of the earlier steps were saved."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, step: int, model) -> bool:
        if step == self.step:
            raise Killed(f"killed at step {step}")
        return False


@pytest.mark.parametrize("interrupted, resumed_from", [
    ("killed in step 3, after the state of step 2", 2),
    ("a finished 2-step run, rerun with steps=3", 1),  # a run's last step is never saved as a state
])
def test_resumed_fit_ends_with_the_same_weights_and_rows_as_an_uninterrupted_one(tmp_path, interrupted,
                                                                                 resumed_from):
    # grad_accumulation=2 with 4 batches an epoch: the 3 steps cross an epoch boundary, resumes skip batches.
    uninterrupted, straight = fit(tmp_path / "straight", save_every=1, grad_accumulation=2)
    assert [p.name for p in sorted((tmp_path / "straight" / "state").iterdir())] == ["step_1", "step_2"]
    again = tmp_path / "again"
    if resumed_from == 2:
        with pytest.raises(Killed):
            fit(again, save_every=1, grad_accumulation=2, after_step=CrashAt(3))
    else:
        fit(again, steps=2, save_every=1, grad_accumulation=2)
    # A fresh model: everything the resumed run knows comes from out/state/.
    resumed, result = fit(again, steps=3, save_every=1, grad_accumulation=2)
    assert result.resumed_from == resumed_from and result.steps == 3
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert [{k: v for k, v in row.items() if k != "images_per_s"} for row in result.history][resumed_from:] == \
        [{k: v for k, v in row.items() if k != "images_per_s"} for row in straight.history][resumed_from:]
    assert [int(row["step"]) for row in result.history] == [1, 2, 3]  # earlier rows read back from metrics.csv


# ---- non-finite training --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    # AdamW's first update with lr=inf makes the weights inf: the next forward pass gives a NaN loss.
    ({"lr": float("inf")}, "step 2: loss is nan — first non-finite tensor: parameter 0.weight"),
    # A NaN clip coefficient turns every gradient into NaN, and the update the weights.
    ({"max_grad_norm": float("nan")}, "step 2: loss is nan — first non-finite tensor: parameter 0.weight"),
    # The update of the last step is caught before the model is returned ...
    ({"lr": float("inf"), "steps": 1}, "step 1: the weights are non-finite after the optimiser step"),
    # ... and before a state is saved.
    ({"lr": float("inf"), "save_every": 1}, "step 1: the weights are non-finite after the optimiser step"),
])
def test_non_finite_training_stops_with_one_error_naming_the_step(tmp_path, overrides, message):
    with pytest.raises(UserError) as error:
        fit(tmp_path, **overrides)
    text = str(error.value)
    assert message in text and "\n" not in text
    assert "max_grad_norm=" in text and "check these keys, the input data and the checkpoint" in text
    assert not (tmp_path / "state").exists()  # not even a half-written one


def test_non_finite_data_names_the_first_non_finite_gradient(tmp_path):
    with pytest.raises(UserError, match=r"^step 1: loss is nan — first non-finite tensor: gradient of 0\.weight "):
        fit(tmp_path, dataset=Regression(nan_labels=True))


# ---- through the real CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """A synthetic 32 x 32 x 8 MR volume with a box label and a manifest with it as the training case."""
    folder = tmp_path_factory.mktemp("training_cli")
    image = (np.random.default_rng(0).random((32, 32, 8)) * 100).astype(np.float32)
    image[8:24, 8:24, 2:6] += 200
    label = np.zeros((32, 32, 8), np.uint8)
    label[8:24, 8:24, 2:6] = 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(folder / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder / "lab.nii.gz"))
    row = {"id": "a", "image": "img.nii.gz", "label": "lab.nii.gz", "modality": "MR", "split": "train"}
    (folder / "m.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    return folder


def test_finetune_that_diverges_exits_with_one_line_naming_the_step_and_no_stage_output(volumes, tmp_path):
    # lr=inf is refused with the config (every float key must be finite), but finite keys can still overflow:
    # AdamW's decoupled decay multiplies the weights by 1 - lr x weight_decay = -1e39, -inf in float32.
    out = tmp_path / "finetune"
    result = run_cli("finetune", f"data={volumes / 'm.jsonl'}", f"out={out}", "num_classes=2", "steps=3",
                     "lr=1", "weight_decay=1e39", "val_split=none", f"cache_dir={volumes / 'cache'}",
                     "encoder=frozen", "embedding_cache=false", "batch_size=1", "arch=vit_tiny", "image_size=256",
                     expect=None)
    assert_one_line_error(result, "step 2: loss is nan", "first non-finite tensor: parameter sam.mask_decoder.",
                          "weight_decay=1e+39")
    assert not (out / "stage_output.json").exists()

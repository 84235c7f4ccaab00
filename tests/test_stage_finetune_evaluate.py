"""``samadapt finetune`` → ``evaluate`` / ``predict`` through the real CLI on real MRI (tiny model, few steps)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import assert_one_line_error, finetune_args, kill_when, launch_two_processes, losses, record_of, run_cli


@pytest.fixture(scope="module")
def finetuned(small_manifests, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetune") / "run"
    run_cli(*finetune_args(small_manifests["brain"], tiny_checkpoint, out))
    return out


@pytest.fixture(scope="module")
def evaluated(finetuned, small_manifests, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    run_cli("evaluate", f"model={finetuned}", f"data={small_manifests['brain']}", "split=test", f"out={out}")
    return out


def test_finetune_learns_and_saves_only_what_it_trained(finetuned):
    record = record_of(finetuned)
    metrics = record["metrics"]
    assert metrics["steps"] == 16 and metrics["train_cases"] == ["mni2mm"] and metrics["val_volumes"] == 1
    with open(finetuned / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    loss, dice = [float(row["loss"]) for row in rows], [float(row["train_dice"]) for row in rows]
    assert len(loss) == 16 and np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4]), loss
    # The batches' Dice rises well above its start (measured: 0.03 over steps 1-4, 0.34 over steps 9-16)
    assert np.mean(dice[-8:]) > np.mean(dice[:4]) + 0.15, dice
    validation = json.loads((finetuned / "validation.json").read_text(encoding="utf-8"))
    assert validation["best_step"] in (8, 16) and 0.0 <= validation["best_dice"] <= 1.0
    assert metrics["best_val_dice"] == validation["best_dice"]
    with safe_open(str(finetuned / "trainable.safetensors"), "pt") as handle:
        names = list(handle.keys())
    with safe_open(str(finetuned / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        adapter_names = list(handle.keys())
    # The full mask decoder beside the LoRA adapter (peft's own folder); never the frozen encoder weights.
    assert any(n.startswith("sam.mask_decoder.") for n in names)
    assert not any(n.startswith("sam.image_encoder.") for n in names)
    assert adapter_names and all("lora_" in n and "image_encoder" in n for n in adapter_names)
    assert (finetuned / "adapter" / "adapter_config.json").is_file()  # peft's own format
    # The same rows as TensorBoard scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(finetuned / "tensorboard"))
    board.Reload()
    logged = {event.step: event.value for event in board.Scalars("finetune/loss")}
    assert sorted(logged) == list(range(1, 17)) and logged[16] == pytest.approx(loss[-1], rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_finetune_resumes_and_matches_an_uninterrupted_run(finetuned, small_manifests, tiny_checkpoint,
                                                                   tmp_path, seed):
    out = tmp_path / "killed"
    args = finetune_args(small_manifests["brain"], tiny_checkpoint, out)
    kill_when(args, out / "state" / "step_8" / "progress.json", delay=random.Random(seed).uniform(0.0, 0.6))
    assert not (out / "stage_output.json").exists()
    run_cli(*args)
    record = record_of(out)
    assert record["metrics"]["resumed_from_step"] == 8
    # Augmentations, sampling and weights continue exactly: the same losses, the same best validation Dice,
    # the same saved decoder.
    reference, again = losses(finetuned), losses(out)
    assert sorted(again) == list(range(1, 17))
    for step in range(9, 17):
        assert again[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), (step, again, reference)
    assert record["metrics"]["best_val_dice"] == pytest.approx(record_of(finetuned)["metrics"]["best_val_dice"],
                                                               abs=1e-5)
    for weights in ("trainable.safetensors", "adapter/adapter_model.safetensors"):  # decoder + head, LoRA
        with safe_open(str(out / weights), "pt") as resumed, safe_open(str(finetuned / weights), "pt") as uninterrupted:
            assert sorted(resumed.keys()) == sorted(uninterrupted.keys())
            for name in uninterrupted.keys():
                torch.testing.assert_close(resumed.get_tensor(name), uninterrupted.get_tensor(name),
                                           rtol=1e-4, atol=1e-5)
    assert not list(out.rglob(".*tmp*"))  # what the killed run had in flight was cleaned up


def test_finetune_runs_as_two_processes(small_manifests, tiny_checkpoint, tmp_path):
    out = tmp_path / "ddp"
    args = finetune_args(small_manifests["brain"], tiny_checkpoint, out, steps=4, save_every=2, val_every=4,
                         batch_size=2)
    result = launch_two_processes(*args)
    record = record_of(out)
    assert record["metrics"]["processes"] == 2 and record["metrics"]["steps"] == 4
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert 0.0 <= record["metrics"]["best_val_dice"] <= 1.0
    assert result.stdout.count("val Dice") == 1  # validated once, on the main process


def test_accumulation_bf16_state_pruning_and_early_stopping(small_manifests, tiny_checkpoint, tmp_path):
    out = tmp_path / "keys"
    # lr ~ 0: the val Dice cannot improve, so patience=2 stops the run at the third validation (step 6)
    run_cli(*finetune_args(small_manifests["brain"], tiny_checkpoint, out, steps=12, lr=1e-12, batch_size=2,
                           grad_accumulation=2, mixed_precision="bf16", save_every=2, keep_states=1, val_every=2,
                           patience=2, train_cases=1))
    record = record_of(out)
    assert record["metrics"]["steps"] == 6 and record["metrics"]["train_cases"] == ["mni2mm"]
    validation = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    assert [row["step"] for row in validation["history"]] == [2, 4, 6] and validation["best_step"] == 2
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step_4"]  # keep_states=1: step_2 pruned
    assert record["config"]["mixed_precision"] == "bf16" and all(np.isfinite(list(losses(out).values())))


def test_evaluate_writes_nnunet_style_summary_and_masks_in_input_geometry(evaluated, small_manifests):
    summary = json.loads((evaluated / "summary.json").read_text(encoding="utf-8"))
    with open(evaluated / "per_case.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["case"], row["label_name"]) for row in rows] == [("colin27_test", "brain")]
    assert summary["label_names"] == {"0": "background", "1": "brain"}
    per_case = summary["metric_per_case"]
    assert len(per_case) == 1 and per_case[0]["reference_file"].endswith("colin27_mask.nii.gz")
    dice = per_case[0]["metrics"]["1"]["Dice"]
    assert 0.0 <= dice <= 1.0
    assert summary["foreground_mean"]["Dice"] == pytest.approx(dice)
    assert float(rows[0]["dice"]) == pytest.approx(dice, abs=1e-6)

    source = nib.load(json.loads(small_manifests["brain"].read_text(encoding="utf-8").splitlines()[2])["image"])
    prediction = nib.load(per_case[0]["prediction_file"])
    assert prediction.shape == source.shape
    np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-4)
    values = set(np.unique(np.asarray(prediction.dataobj)).tolist())
    assert values <= {0, 1}
    # The stored Dice is the Dice of the written mask against the reference.
    reference = np.asarray(nib.load(per_case[0]["reference_file"]).dataobj) > 0
    predicted = np.asarray(prediction.dataobj) > 0
    recomputed = 2 * (reference & predicted).sum() / (reference.sum() + predicted.sum())
    assert dice == pytest.approx(recomputed, abs=1e-4)
    assert any((evaluated / "overlays").glob("*.png"))


def test_predict_writes_one_mask_per_image(finetuned, small_manifests, tmp_path):
    image = json.loads(small_manifests["brain"].read_text(encoding="utf-8").splitlines()[0])["image"]
    run_cli("predict", f"model={finetuned}", f"input={image}", f"out={tmp_path / 'pred'}")
    written = list((tmp_path / "pred").glob("*.nii.gz"))
    assert len(written) == 1
    assert nib.load(written[0]).shape == nib.load(image).shape


def test_frozen_encoder_with_box_prompts_uses_the_embedding_cache_and_exports_merged_sam(
        small_manifests, tiny_checkpoint, tmp_path):
    out = tmp_path / "frozen"
    result = run_cli(*finetune_args(small_manifests["brain"], tiny_checkpoint, out, encoder="frozen", prompt="box",
                                    steps=6, val_every=6, save_every=3, export_merged="true",
                                    cache_dir=tmp_path / "cache"))
    assert "embedding cache:" in result.stdout
    merged = torch.load(out / "sam_merged.pth", map_location="cpu", weights_only=True)
    base = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert set(merged) == set(base)
    assert all(torch.equal(merged[k], base[k]) for k in base if k.startswith("image_encoder."))
    assert any(not torch.equal(merged[k], base[k]) for k in base if k.startswith("mask_decoder."))
    # A merged checkpoint is a plain SAM: evaluate takes it as model= with box prompts (the classes from the
    # manifest's labels.json, as num_classes= is not given).
    evaluated = tmp_path / "eval_merged"
    run_cli("evaluate", f"model={out / 'sam_merged.pth'}", "arch=vit_tiny", "image_size=256",
            "prompt=box", f"data={small_manifests['brain']}", f"out={evaluated}", "overlays=false")
    assert record_of(evaluated)["metrics"]["cases"] == 1
    summary = json.loads((evaluated / "summary.json").read_text(encoding="utf-8"))
    assert list(summary["mean"]) == ["1"] and summary["label_names"] == {"0": "background", "1": "brain"}


def test_labels_beyond_num_classes_are_refused_naming_the_file(small_manifests, tiny_checkpoint, tmp_path):
    row = json.loads(small_manifests["brain"].read_text(encoding="utf-8").splitlines()[0])
    mask = nib.load(row["label"])
    bad = tmp_path / "three_classes.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8) * 3, mask.affine), bad)
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({**row, "label": str(bad)}) + "\n", encoding="utf-8")
    result = run_cli(*finetune_args(manifest, tiny_checkpoint, tmp_path / "out", val_split="none"), expect=None)
    assert_one_line_error(result, "three_classes.nii.gz", "num_classes")
    assert not (tmp_path / "out" / "stage_output.json").exists()


def test_unknown_lora_target_is_refused(small_manifests, tiny_checkpoint, tmp_path):
    result = run_cli(*finetune_args(small_manifests["brain"], tiny_checkpoint, tmp_path / "out",
                                    **{"lora.targets": "qkv,nonexistent"}), expect=None)
    assert_one_line_error(result, "nonexistent")


def test_evaluate_refuses_a_folder_that_is_not_a_finished_run(small_manifests, tmp_path):
    (tmp_path / "half").mkdir()
    result = run_cli("evaluate", f"model={tmp_path / 'half'}", f"data={small_manifests['brain']}",
                     f"out={tmp_path / 'ev'}", expect=None)
    assert_one_line_error(result, "half")


def test_predict_is_independent_of_voxel_order_and_keeps_each_input_geometry(finetuned, small_manifests, tmp_path):
    """The same anatomy stored in another voxel order (LSA, flipped and permuted axes) with an offset origin:
    each mask carries its input's exact header, and in world space both masks are the same."""
    source_path = json.loads(small_manifests["brain"].read_text(encoding="utf-8").splitlines()[0])["image"]
    source = nib.load(source_path)
    current = nib.orientations.io_orientation(source.affine)
    reoriented = source.as_reoriented(nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("LSA")))
    shifted = nib.Nifti1Image(np.asarray(reoriented.dataobj), reoriented.affine.copy())
    shifted.affine[:3, 3] += (12.5, -7.0, 3.0)
    shifted = nib.Nifti1Image(np.asarray(reoriented.dataobj), shifted.affine)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(shifted, inputs / "lsa_shifted.nii.gz")
    run_cli("predict", f"model={finetuned}", f"input={source_path}", f"out={tmp_path / 'a'}")
    run_cli("predict", f"model={finetuned}", f"input={inputs}", f"out={tmp_path / 'b'}")
    original = nib.load(next((tmp_path / "a").glob("*.nii.gz")))
    moved = nib.load(tmp_path / "b" / "lsa_shifted.nii.gz")
    assert moved.shape == shifted.shape and nib.aff2axcodes(moved.affine) == ("L", "S", "A")
    np.testing.assert_allclose(moved.affine, shifted.affine, atol=1e-4)
    np.testing.assert_allclose(original.affine, source.affine, atol=1e-4)
    back = nib.as_closest_canonical(moved)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(nib.as_closest_canonical(original).dataobj))
    assert np.asarray(original.dataobj).any()  # a non-trivial mask, so the comparison means something


def test_evaluate_warns_about_a_modality_the_model_never_saw(finetuned, small_manifests, tmp_path):
    rows = [json.loads(line) for line in small_manifests["brain"].read_text(encoding="utf-8").splitlines()]
    manifest = tmp_path / "ct.jsonl"
    manifest.write_text(json.dumps({**rows[2], "modality": "CT", "split": "test"}) + "\n", encoding="utf-8")
    result = run_cli("evaluate", f"model={finetuned}", f"data={manifest}", f"out={tmp_path / 'ev'}", "overlays=false")
    assert "warning:" in result.stderr and "CT" in result.stderr and "MR" in result.stderr
    assert record_of(tmp_path / "ev")["metrics"]["cases"] == 1


def test_two_process_evaluation_splits_cases_and_gathers_each_once(finetuned, small_manifests, tmp_path):
    rows = [json.loads(line) for line in small_manifests["brain"].read_text(encoding="utf-8").splitlines()]
    manifest = tmp_path / "two.jsonl"
    manifest.write_text("".join(json.dumps({**row, "split": "test"}) + "\n" for row in rows[1:]), encoding="utf-8")
    # a tiny crop of real MRI as a third case: any volume size works, the mask keeps the crop's shape
    image, label = nib.load(rows[0]["image"]), nib.load(rows[0]["label"])
    crop = (slice(40, 46), slice(50, 55), slice(40, 44))
    for source, name in ((image, "crop.nii.gz"), (label, "crop_mask.nii.gz")):
        nib.save(source.slicer[crop], tmp_path / name)
    with open(manifest, "a", encoding="utf-8") as handle:
        row = {"id": "crop", "image": str(tmp_path / "crop.nii.gz"), "label": str(tmp_path / "crop_mask.nii.gz"),
               "modality": "MR", "split": "test"}
        handle.write(json.dumps(row) + "\n")
    out = tmp_path / "ev2"
    launch_two_processes("evaluate", f"model={finetuned}", f"data={manifest}", f"out={out}", "overlays=false")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    cases = {c["case_id"]: c for c in summary["metric_per_case"]}
    assert sorted(cases) == ["colin27", "colin27_test", "crop"]  # every case once, none twice
    assert nib.load(cases["crop"]["prediction_file"]).shape == (6, 5, 4)
    # Both Colin27 rows are the same volume: the two processes predicted it identically.
    assert cases["colin27"]["metrics"]["1"]["Dice"] == pytest.approx(cases["colin27_test"]["metrics"]["1"]["Dice"])
    # The mean is the mean of the per-case values (NaN-free cases only), recomputed here.
    dice = [c["metrics"]["1"]["Dice"] for c in cases.values() if c["metrics"]["1"]["Dice"] is not None]
    assert summary["mean"]["1"]["Dice"] == pytest.approx(float(np.mean(dice)))
    assert summary["foreground_mean"]["Dice"] == pytest.approx(float(np.mean(dice)))

"""``samadapt predict``: segment volumes and write label maps with exactly the input's geometry.

``input`` is an image file, a folder (image files and DICOM series sub-folders) or a manifest. Each
output is named after the input (the case id for manifests) in the input's format (DICOM → NIfTI);
``save_probabilities=true`` adds ``<name>_probabilities.nii.gz`` (4D, one volume per class). With
``prompts=FILE`` (:mod:`samadapt.user_prompts`) a box-prompted model or a SAM checkpoint (``model=litemedsam``)
segments each case from the user's 3-D boxes, propagated slice by slice (:mod:`samadapt.propagation`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState
from tqdm.auto import tqdm

from samadapt.data import VolumeSlices
from samadapt.data.formats import MANIFEST_SUFFIXES, VOLUME_SUFFIXES, WRITABLE_SUFFIXES, output_name, volume_stem
from samadapt.data.manifest import load_label_names, load_manifest
from samadapt.errors import UserError
from samadapt.evaluate.config import PredictConfig
from samadapt.inference import AUTOMATIC, LoadedModel, load_model, predict_slices
from samadapt.io import ensure_writable_dir
from samadapt.propagation import propagate_boxes
from samadapt.stage_record import hold_lock
from samadapt.user_prompts import UserBox, canvas_boxes, read_prompts


def list_inputs(spec: str, modality: str | None, default_modality: str) -> list[tuple[str, Path, str, str | None]]:
    """``(output file name, image path, modality, DICOM series uid)`` for every volume ``spec`` names."""
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{path}: input not found")
    if path.is_file() and path.name.endswith(MANIFEST_SUFFIXES):
        return [(output_name(c.image, c.id), c.image, modality or c.modality, c.series_uid)
                for c in load_manifest(path)]
    if path.is_file():
        return [(output_name(path), path, modality or default_modality, None)]
    found = sorted(p for p in path.iterdir() if p.name.endswith(VOLUME_SUFFIXES) or (p.is_dir() and any(p.iterdir())))
    if not found:
        raise UserError(f"{path}: no images (*.nii.gz, *.nrrd, *.mha) or DICOM series folders inside")
    return [(output_name(p), p, modality or default_modality, None) for p in found]


def run(config: PredictConfig) -> list[Path]:
    state = PartialState()
    loaded = _load(config)
    default_modality = loaded.train_modalities[0] if loaded.train_modalities else "MR"
    inputs = list_inputs(config.input, config.modality, default_modality)
    out = Path(config.out)
    check_targets(inputs, out, config.save_probabilities)
    user_boxes = _user_boxes(config, loaded.num_classes, inputs)
    ensure_writable_dir(out)
    lock = hold_lock(out) if state.is_main_process else None
    model = loaded.model.to(state.device)
    written = []
    with state.split_between_processes(inputs) as mine:
        for name, image, modality, series_uid in tqdm(mine, desc="predict", unit="volume",
                                                      disable=not state.is_main_process):
            slices = VolumeSlices(image, loaded.prep, modality, series_uid=series_uid)
            target = out / name
            if user_boxes is not None:
                boxes = canvas_boxes(slices, user_boxes.get(volume_stem(name), []), loaded.num_classes, str(image))
                labels = slices.to_volume(propagate_boxes(model, slices, boxes, config.batch_size, state.device))
            elif config.save_probabilities:
                scores = predict_slices(model, slices, config.batch_size, AUTOMATIC, state.device, probabilities=True)
                slices.save_probabilities(scores, out / probabilities_name(name))
                labels = slices.to_volume(scores)
            else:
                labels = slices.to_volume(predict_slices(model, slices, config.batch_size, AUTOMATIC, state.device))
            written.append(slices.write(labels, target))
    if lock is not None:
        lock.release()
    if state.is_main_process:
        print(f"predict: wrote {len(written)} mask(s) to {out}")
    return written


def _load(config: PredictConfig) -> LoadedModel:
    """The model; box-prompted models and SAM checkpoints need ``prompts=`` (predict has no reference labels)."""
    if config.prompts is not None:
        loaded = load_model(config, "box", default_num_classes=2)
        if loaded.prompt != "box":
            raise UserError(f"{config.model}: trained with prompt={loaded.prompt} — prompts= boxes need a "
                            "box-prompted model or a SAM checkpoint (e.g. model=litemedsam)")
        return loaded
    if not Path(config.model).is_dir():
        raise UserError(f"{config.model}: a SAM checkpoint segments only with prompts — give prompts=FILE "
                        "(3-D boxes per case), or a model fine-tuned with prompt=none")
    loaded = load_model(config, None)
    if loaded.prompt != "none":
        raise UserError(f"{config.model}: trained with prompt={loaded.prompt} — give prompts=FILE (3-D boxes per "
                        "case), or use a model fine-tuned with prompt=none")
    return loaded


def _user_boxes(config: PredictConfig, num_classes: int, inputs: list) -> dict[str, list[UserBox]] | None:
    """The prompts file's boxes by case, checked against the inputs before any inference (None: no file)."""
    if config.prompts is None:
        return None
    manifest = Path(config.input)
    names = load_label_names(manifest) if manifest.is_file() and manifest.name.endswith(MANIFEST_SUFFIXES) else None
    boxes = read_prompts(config.prompts, names, num_classes)
    cases = {volume_stem(name) for name, *_ in inputs}
    unknown = sorted(set(boxes) - cases)
    if unknown:
        raise UserError(f"{config.prompts}: case {unknown[0]!r} is not among the inputs ({', '.join(sorted(cases))})")
    unprompted = sorted(cases - set(boxes))
    if unprompted and PartialState().is_main_process:
        print(f"warning: {config.prompts}: no box for {', '.join(unprompted)} — their masks are background",
              file=sys.stderr)
    return boxes


def probabilities_name(name: str) -> str:
    """``scan.nii.gz`` → ``scan_probabilities.nii.gz`` (always NIfTI: a 4D image)."""
    stem = next(name[: -len(s)] for s in WRITABLE_SUFFIXES if name.endswith(s))
    return f"{stem}_probabilities.nii.gz"


def check_targets(inputs: list[tuple[str, Path, str, str | None]], out: Path, probabilities: bool) -> None:
    """Refuse before any inference when an output would overwrite an input or two outputs share a name."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: out= is a file, not a folder — choose a folder for the masks")
    sources = {image.resolve(): image for _, image, _, _ in inputs}
    claimed: dict[str, Path] = {}
    for name, image, _, _ in inputs:
        for target in [name, probabilities_name(name)] if probabilities else [name]:
            if target in claimed:
                raise UserError(f"{out / target}: both {claimed[target]} and {image} would be written to this name — "
                                "rename one of the inputs or predict them into separate folders")
            claimed[target] = image
            if (out / target).resolve() in sources:
                raise UserError(f"{out / target}: the mask of {image} would overwrite the input "
                                f"{sources[(out / target).resolve()]} — choose another out=")

"""``samadapt data ...``: import datasets into manifests, fetch the demo data, check manifests.

Only argparse at import time; the handlers import the heavy modules when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from samadapt.config import key
from samadapt.data.preprocessing import preprocessing_fields
from samadapt.errors import UserError


def add_parser(subparsers) -> None:
    """Add the ``data`` command group to the samadapt CLI."""
    data = subparsers.add_parser("data", help="import datasets into manifests, fetch demo data, check manifests",
                                 description="Data tools: import, demo, check.")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    imp = commands.add_parser(
        "import", help="nnU-Net v2 raw / MSD dataset folder, or a folder of NIfTI/DICOM → manifest",
        description="Write a manifest (JSON Lines, or CSV for out=*.csv) for a dataset folder: nnU-Net v2 raw or "
                    "Medical Segmentation Decathlon (labels + <stem>.labels.json), or any folder of NIfTI/NRRD/MHA "
                    "files and DICOM series (unlabeled, for SSL). Splits are by case, seeded.")
    imp.add_argument("folder", help="dataset folder")
    imp.add_argument("out", metavar="out=MANIFEST.jsonl", help="manifest to write (.jsonl, or .csv for CSV)")
    imp.add_argument("--val-fraction", type=float, default=0.0, help="fraction of training cases → split=val")
    imp.add_argument("--folds", type=int, default=None, help="write a fold column 0..K-1 over the train cases")
    imp.add_argument("--seed", type=int, default=0, help="seed of the case shuffle")
    imp.add_argument("--modality", default="MR", help="modality of a plain folder's images: MR or CT (any case)")
    imp.add_argument("--channel", type=int, default=0, help="nnU-Net channel (_000K file) to use as image")
    imp.set_defaults(func=_import)

    demo = commands.add_parser("demo", help="fetch + verify the demo MRI volumes; print where they are",
                               description="Fetch the demo volumes from PyPI/Debian (pinned, sha256-checked) "
                                           "into the cache; reruns work offline.")
    demo.set_defaults(func=_demo)

    check = commands.add_parser("check", help="validate a manifest and read every volume header",
                                description="Validate a manifest (files, ids, modality, split), read every "
                                            "image/label header and print a table; with num_classes=K also "
                                            "decode every volume (truncated files, NaN/Inf voxels, 4D images) "
                                            "and check the label values.")
    check.add_argument("manifest", help="manifest path or demo:brain / demo:ssl")
    check.add_argument("options", nargs="*", metavar="key=value",
                       help="optional: num_classes=K, channel=C (4D images), resample_labels=true")
    check.set_defaults(func=_check)


CheckKeys = dataclasses.make_dataclass("CheckKeys", [
    ("num_classes", int | None, key(None, "also decode every volume and check label values are in 0..K-1")),
    *preprocessing_fields(include=("channel", "resample_labels")),  # the same keys as the stages'
], kw_only=True)
CheckKeys.__doc__ = "Keys of ``samadapt data check`` (the data keys of the stages that matter for reading volumes)."


def _import(args: argparse.Namespace) -> int:
    from samadapt.data.importers import import_dataset

    name, sep, out = args.out.partition("=")
    if not sep or name != "out" or not out:
        raise UserError(f"{args.out!r}: expected out=<manifest.jsonl> (or out=<manifest.csv>)")
    summary = import_dataset(args.folder, out, args.val_fraction, args.folds, args.seed, args.modality, args.channel)
    print(json.dumps(summary, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from samadapt.data.demo import demo_files, ensure_demo_data
    from samadapt.data.manifest import DEMO_MANIFESTS, packaged_manifest

    folder = ensure_demo_data()
    print(f"demo data: {folder} ({len(demo_files())} files, sha256 verified)")
    for name, file in DEMO_MANIFESTS.items():
        print(f"  data=demo:{name}  →  {packaged_manifest(file)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    import numpy as np

    from samadapt.config import parse_config
    from samadapt.data.manifest import load_manifest, resolve_manifest
    from samadapt.data.readers import label_grid_error, read_header, read_label, read_volume

    options = parse_config(CheckKeys, None, args.options)
    num_classes, channel = options.num_classes, options.channel
    path = resolve_manifest(args.manifest)
    cases = load_manifest(path)
    problems = []
    print(f"{'id':24} {'split':5} {'mod':3} {'size (x,y,z)':16} {'spacing mm (x,y,z)':22} label")
    for case in cases:
        try:
            header = read_header(case.image, case.series_uid)
            size = "x".join(str(s) for s in header["size"])
            spacing = ",".join(f"{s:.3g}" for s in header["spacing"])
            label = "-"
            # num_classes=K: decode every volume (truncation, NaN/Inf, 4D) besides checking label values.
            image = read_volume(case.image, channel, case.series_uid) if num_classes is not None else None
            if case.label is not None:
                if image is None and options.resample_labels:
                    read_header(case.label)  # readable; any grid is resampled onto the image's
                    label = "ok (resampled)"
                elif image is None:
                    error = label_grid_error(read_header(case.label), header, case.label, case.image)
                    if error is not None:
                        raise error
                    label = "ok"
                else:
                    values = read_label(case.label, image, case.image, options.resample_labels, num_classes)
                    label = "values {" + ",".join(str(v) for v in np.unique(values)) + "}"
        except UserError as exc:
            problems.append(str(exc))
            size, spacing, label = "?", "?", "ERROR"
        print(f"{case.id[:24]:24} {case.split or '-':5} {case.modality:3} {size:16} {spacing:22} {label}")
    if problems:
        raise UserError(f"{path}: {len(problems)} problem(s) — " + "; ".join(problems))
    print(f"{path}: {len(cases)} cases ok")
    return 0

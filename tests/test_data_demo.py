"""Demo data: ``samadapt data demo`` fetches real volumes (a few MB from PyPI/Debian, once per cache) and the
packaged manifests point at them. Uses the normal cache ($SAMADAPT_CACHE or ~/.cache/samadapt)."""

import subprocess
import sys

import numpy as np

from samadapt.data import readers
from samadapt.data.demo import demo_files, ensure_demo_data
from samadapt.data.manifest import load_label_names, load_manifest, resolve_manifest


def test_data_demo_then_manifests_point_at_real_files(monkeypatch):
    result = subprocess.run(
        [sys.executable, "-m", "samadapt.cli", "data", "demo"], capture_output=True, encoding="utf-8"
    )
    assert result.returncode == 0, result.stderr
    assert "data=demo:brain" in result.stdout and "data=demo:ssl" in result.stdout
    assert all(path.is_file() for path in demo_files())

    # offline rerun: everything verified from the cache, no download attempted
    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to run {args[0]}")

    monkeypatch.setattr(subprocess, "run", no_network)
    ensure_demo_data(log=lambda message: None)

    brain = load_manifest(resolve_manifest("demo:brain"), require_labels=True)
    assert {c.split for c in brain} == {"train", "val", "test"}
    train_ids = {c.id for c in brain if c.split == "train"}
    test = [c for c in brain if c.split == "test"]
    assert test and not train_ids & {c.id for c in test}
    assert load_label_names(resolve_manifest("demo:brain")) == {0: "background", 1: "brain"}
    for case in test:
        image = readers.read_volume(case.image)
        mask = readers.read_label(case.label, image, case.image, num_classes=2)
        assert 0.15 < mask.mean() < 0.35  # a brain is about a quarter of the head volume
    ssl = load_manifest(resolve_manifest("demo:ssl"))
    assert len(ssl) >= 3 and all(c.image.is_file() and c.label is None for c in ssl)
    assert not {c.image for c in ssl} & {c.image for c in test}  # the test subject stays unseen
    assert np.isfinite(readers.to_array(readers.read_volume(ssl[0].image), ssl[0].image)).all()

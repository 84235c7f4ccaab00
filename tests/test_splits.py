"""Case splits like nnU-Net (``samadapt.data.splits``): the rules on hand-made case lists, cross-validation x seeds
through the pipeline matrix, and real ``samadapt finetune`` runs on a train-only and on an unsplit manifest."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import record_of, run_cli
from samadapt.config import build, from_record
from samadapt.data.manifest import Case, load_manifest, select
from samadapt.data.splits import SplitKeys, choose_split, kfold
from samadapt.errors import UserError
from samadapt.finetune.config import FinetuneConfig
from samadapt.keys import SeedKeys
from samadapt.pipelines.runner import locate, plan, resolve_config


def _cases(*splits: str, fold=None, label=True) -> list[Case]:
    return [Case(f"case{i:02d}", Path(f"img{i}.nii.gz"), Path(f"lab{i}.nii.gz") if label else None, "MR", s,
                 None if fold is None else fold[i]) for i, s in enumerate(splits)]


@dataclass(kw_only=True)
class _Keys(SplitKeys, SeedKeys):  # the training seed: only the few-shot choice reads it
    pass


def _keys(**values) -> _Keys:
    return _Keys(**values)


def test_kfold_partitions_sorted_ids_by_seed_and_ignores_their_order():
    ids = [f"sub{i:03d}" for i in range(23)]
    folds = kfold(ids, 5, 12345)
    assert sorted(i for fold in folds for i in fold) == sorted(ids)  # every case exactly once
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]  # sklearn's KFold sizes: the first 23 % 5 folds larger
    shuffled = random.Random(3).sample(ids, len(ids))
    assert kfold(shuffled, 5, 12345) == folds  # a function of the set of ids, not of the manifest's row order
    assert kfold(ids, 5, 12345) == folds and kfold(ids, 5, 1) != folds
    with pytest.raises(ValueError, match="cannot make"):
        kfold(ids[:3], 5, 0)


def test_cross_validation_folds_partition_the_development_cases_and_never_touch_test():
    cases = _cases(*[""] * 7, "train", "train", "val", "test", "test")
    development = {c.id for c in cases if c.split != "test"}
    vals = []
    for k in range(5):
        split = choose_split(cases, _keys(fold=k), "m.jsonl")
        train, val = {c.id for c in split.train}, {c.id for c in split.val}
        assert not train & val and train | val == development  # case-disjoint, nothing lost
        assert split.record["test"] == ["case10", "case11"] and split.record["scheme"] == "cross-validation"
        assert split.record["splits_final"][k] == {"train": sorted(train), "val": sorted(val)}  # nnU-Net's layout
        vals.append(val)
    assert sorted(i for v in vals for i in v) == sorted(development)  # each case validates exactly once
    again = choose_split(cases, _keys(fold=2, seed=7), "m.jsonl")  # the training seed does not move the folds
    assert again.record == choose_split(cases, _keys(fold=2), "m.jsonl").record
    other = choose_split(cases, _keys(fold=2, split_seed=1), "m.jsonl")
    assert other.record["splits_final"] != again.record["splits_final"]
    quiet = choose_split(cases, _keys(fold=2, val_split=None), "m.jsonl")  # the held-out fold is left out
    assert quiet.val == [] and quiet.record["unused"] == again.record["val"] and quiet.train == again.train
    with pytest.raises(UserError, match="fold=5: with folds=5"):
        choose_split(cases, _keys(fold=5), "m.jsonl")
    with pytest.raises(UserError, match="needs at least folds=20"):
        choose_split(cases, _keys(fold=0, folds=20), "m.jsonl")


def test_hold_out_only_when_the_manifest_names_no_val_rows(capsys):
    unsplit = _cases(*[""] * 9, "test")
    split = choose_split(unsplit, _keys(), "m.jsonl")
    assert split.record["scheme"] == "hold-out" and len(split.val) == 2 and len(split.train) == 7  # fold 0 of 5
    assert {c.id for c in split.val} == set(kfold([c.id for c in unsplit[:9]], 5, 12345)[0])
    assert "holding out 2 of 9 cases" in capsys.readouterr().out
    named = choose_split(_cases("train", "", "val", "test"), _keys(), "m.jsonl")
    assert [c.id for c in named.train] == ["case00", "case01"] and [c.id for c in named.val] == ["case02"]
    assert named.record["scheme"] == "manifest"
    off = choose_split(_cases("train", "train", "val"), _keys(val_split=None), "m.jsonl")
    assert off.val == [] and off.record["unused"] == ["case02"]
    single = choose_split(_cases("train", "test"), _keys(), "m.jsonl")
    assert [c.id for c in single.train] == ["case00"] and single.val == []
    assert "training without validation" in capsys.readouterr().err


def test_fold_column_few_shot_labels_and_key_checks():
    cases = _cases("train", "train", "train", "train", "val", fold=[0, 1, 0, 1, None])
    split = choose_split(cases, _keys(fold=1), "m.jsonl")
    assert [c.id for c in split.val] == ["case01", "case03"] and split.record["scheme"] == "manifest fold column"
    assert split.record["unused"] == ["case04"]  # a row without a fold is in no fold
    assert [c.id for c in select(cases, "val", 1)] == ["case01", "case03"]  # the reader's fold= follows the rule
    few = choose_split(_cases(*["train"] * 6), _keys(val_split=None, train_cases=2, seed=3), "m.jsonl")
    assert len(few.train) == 2 and few.train != choose_split(
        _cases(*["train"] * 6), _keys(val_split=None, train_cases=2, seed=4), "m.jsonl").train
    with pytest.raises(UserError, match="case00 have no label"):
        choose_split(_cases("train", "test", label=False), _keys(), "m.jsonl")
    with pytest.raises(UserError, match="no cases to train on"):
        choose_split(_cases("test"), _keys(), "m.jsonl")
    with pytest.raises(UserError, match="split=test: test rows are never trained"):
        build(FinetuneConfig, {"data": "m.jsonl", "out": "o", "num_classes": 2, "split": "test"})


def test_cross_validation_and_seeds_are_one_pipeline_through_the_matrix(tmp_path):
    source = locate("cross_validation")
    spec = yaml.safe_load(source.read_text(encoding="utf-8"))
    stages = plan(spec, source, tmp_path / "runs")
    by_name = {s.name: s for s in stages}
    cells = [s.name for s in stages if s.base == "baseline"]
    assert cells == ["baseline/0-0", "baseline/0-1", "baseline/1-0", "baseline/1-1"]
    for name in ("finetune/1-0", "baseline/1-0"):
        config = resolve_config(by_name[name], by_name, spec["defaults"], {})
        assert (config.fold, config.seed, config.folds) == (1, 0, 2)
    evaluate = resolve_config(by_name["evaluate_baseline/0-1"], by_name, spec["defaults"], {})
    assert evaluate.model == str(tmp_path / "runs" / "baseline" / "0-1")


@pytest.fixture(scope="module")
def manifests(small_manifests, tmp_path_factory) -> dict[str, Path]:
    """train-only: the MNI volume (train) + a test row; unsplit: MNI and Colin27 with empty splits + a test row."""
    rows = {r["id"]: r for r in map(json.loads, small_manifests["brain"].read_text(encoding="utf-8").splitlines())}
    folder = tmp_path_factory.mktemp("split_manifests")
    tables = {"train_only": [rows["mni2mm"], rows["colin27_test"]],
              "unsplit": [{**rows["mni2mm"], "split": ""}, {**rows["colin27"], "split": ""}, rows["colin27_test"]]}
    paths = {}
    for name, table in tables.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")
    return paths


TINY = ["num_classes=2", "arch=vit_tiny", "image_size=64", "steps=2", "batch_size=2", "encoder=frozen",
        "decoder=full", "embedding_cache=false", "log_every=1", "tensorboard=false"]


def test_a_train_only_manifest_fine_tunes_without_validation(manifests, tmp_path):
    out = tmp_path / "train_only"
    result = run_cli("finetune", f"data={manifests['train_only']}", f"out={out}", *TINY)
    assert "training without validation" in result.stderr
    metrics = record_of(out)["metrics"]
    assert metrics["train_cases"] == ["mni2mm"] and metrics["val_volumes"] == 0 and metrics["steps"] == 2
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert splits["train"] == ["mni2mm"] and splits["val"] == [] and splits["test"] == ["colin27_test"]
    assert not (out / "validation.json").exists()


def test_an_unsplit_manifest_is_split_by_case_recorded_and_reproducible(manifests, tmp_path):
    out = tmp_path / "unsplit"
    run_cli("finetune", f"data={manifests['unsplit']}", f"out={out}", *TINY)
    record = record_of(out)
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert splits["scheme"] == "hold-out" and splits["test"] == ["colin27_test"]
    assert sorted(splits["train"] + splits["val"]) == ["colin27", "mni2mm"] and len(splits["val"]) == 1
    assert record["metrics"]["val_cases"] == splits["val"] and record["metrics"]["train_cases"] == splits["train"]
    assert json.loads((out / "validation.json").read_text(encoding="utf-8"))["best_step"] == 2
    assert record["artifacts"]["splits"] == "splits.json"
    # The same split again from the manifest and the recorded keys alone
    config = from_record(FinetuneConfig, record["config"], out / "stage_output.json")
    again = choose_split(load_manifest(manifests["unsplit"]), config, manifests["unsplit"])
    assert {k: v for k, v in splits.items() if k != "manifest"} == again.record


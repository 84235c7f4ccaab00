"""``compare``: means ± std over seeds, paired per-case statistics against a reference (Wilcoxon p and bootstrap CI
checked against independent computations), case counts, nnU-Net summaries as rows, the pipeline's compare key."""

import csv
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.stats import bootstrap, rankdata, wilcoxon
from test_report import CASES

from conftest import assert_one_line_error, run_cli
from samadapt.compare import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, compare_runs, groups_by_pattern, paired_statistics
from samadapt.errors import UserError
from samadapt.io import write_json
from samadapt.pipelines.comparison import check_compare, compare_stages, group_name, parse_compare
from samadapt.pipelines.runner import _cell_id
from samadapt.report import summarize

NAN = math.nan


def write_eval_dir(path, cases, tolerances=(1.0, 2.0), empty_penalty=True):
    path.mkdir(parents=True)
    write_json(path / "summary.json", summarize(cases, nsd_tolerances_mm=tolerances, empty_penalty=empty_penalty))
    (path / "stage_output.json").write_text("{}", encoding="utf-8")  # a finished stage, for the pipeline tests
    return path


def dice_case(name, dice, hd95=3.0, n_ref=100, voxels=100_000):
    """One class with a hand-set Dice and HD95; counts consistent with the Dice (TP from 2TP / (2TP + FP + FN))."""
    tp = round(dice * n_ref)
    counts = {"TP": tp, "FP": n_ref - tp, "FN": n_ref - tp, "TN": voxels - 2 * n_ref + tp, "n_pred": n_ref,
              "n_ref": n_ref}
    scores = {"Dice": dice, "IoU": dice / (2 - dice), "NSD_1mm": dice, "NSD_2mm": dice, "HD95": hd95}
    return {"case_id": name, "reference_file": f"/labels/{name}.nii.gz", "prediction_file": f"/p/{name}.nii.gz",
            "metrics": {1: scores | counts}}


CASE_IDS = [f"case{i}" for i in range(8)]
# Per-case Dice of two methods, two seeds each (base: the reference; ssl: small gains, one loss). The paired
# differences of the seed means are distinct (no ties), so scipy's Wilcoxon is the exact one.
DICE = {
    ("base", 0): [0.80, 0.70, 0.90, 0.60, 0.75, 0.85, 0.65, 0.72],
    ("base", 1): [0.78, 0.74, 0.88, 0.62, 0.73, 0.83, 0.69, 0.71],
    ("ssl", 0): [0.84, 0.75, 0.91, 0.58, 0.80, 0.90, 0.70, 0.79],
    ("ssl", 1): [0.86, 0.77, 0.93, 0.59, 0.81, 0.88, 0.75, 0.80],
}


def matrix_dirs(tmp_path, drop=None):
    """Evaluate folders runs/evaluate_<method>/<seed> of the 2 x 2 matrix (``drop``: a case left out of ssl/1)."""
    dirs = {}
    for (method, seed), dice in DICE.items():
        cases = [dice_case(name, d, hd95=10 * (1 - d)) for name, d in zip(CASE_IDS, dice)
                 if not (drop and (method, seed) == ("ssl", 1) and name == drop)]
        dirs[f"evaluate_{method}/{seed}"] = write_eval_dir(tmp_path / "runs" / f"evaluate_{method}" / str(seed), cases)
    return dirs


def exact_wilcoxon_p(d):
    """Two-sided exact signed-rank p by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    null = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))])
    return min(1.0, 2 * min((null <= observed).mean(), (null >= observed).mean()))


def test_a_two_seed_by_two_run_matrix_gives_means_std_and_paired_statistics(tmp_path):
    dirs = matrix_dirs(tmp_path)
    names = list(dirs)
    markdown = compare_runs(list(dirs.values()), tmp_path / "compare", names=names,
                            groups=[name.split("/")[0] for name in names], reference="evaluate_base")
    lines = markdown.splitlines()
    # mean ± std over the two seeds of each seed's mean over cases
    for method in ("base", "ssl"):
        run_means = [np.mean(DICE[(method, seed)]) for seed in (0, 1)]
        row = next(line for line in lines if line.startswith(f"| evaluate_{method} | 2 | 1 |"))
        assert f"| {np.mean(run_means):.4f} ± {np.std(run_means, ddof=1):.4f} |" in row
        assert row.startswith(f"| evaluate_{method} | 2 | 1 | 16 |") and row.endswith("| 0 | 0 | 0 | 0 |")
    # per case: the seeds' mean; paired difference ssl - base
    d = np.mean([DICE[("ssl", s)] for s in (0, 1)], axis=0) - np.mean([DICE[("base", s)] for s in (0, 1)], axis=0)
    rows = list(csv.DictReader((tmp_path / "compare_paired.csv").open()))
    dice = next(r for r in rows if r["score"] == "Dice" and r["label"] == "1")
    assert (dice["run"], dice["reference"], dice["pairs"]) == ("evaluate_ssl", "evaluate_base", "8")
    assert float(dice["mean_difference"]) == pytest.approx(d.mean(), abs=1e-6)
    assert float(dice["wilcoxon_p"]) == pytest.approx(exact_wilcoxon_p(d), rel=1e-4)
    assert (dice["better"], dice["worse"], dice["tied"]) == ("7", "1", "0")
    def scipy_ci(seed):
        return bootstrap((d,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", confidence_level=0.95,
                         rng=np.random.default_rng(seed)).confidence_interval

    # scipy draws the same resamples from the same seed: the same interval; from another seed: within the
    # Monte-Carlo error (on these 0.005-step differences a few lattice steps of 0.000625)
    same, other = scipy_ci(BOOTSTRAP_SEED), scipy_ci(123)
    assert (float(dice["ci_low"]), float(dice["ci_high"])) == pytest.approx((same.low, same.high), abs=1e-6)
    assert (float(dice["ci_low"]), float(dice["ci_high"])) == pytest.approx((other.low, other.high), abs=0.1 * d.std())
    assert float(dice["ci_low"]) < d.mean() < float(dice["ci_high"])
    hd95 = next(r for r in rows if r["score"] == "HD95")
    assert float(hd95["mean_difference"]) == pytest.approx(-10 * d.mean(), abs=1e-6)
    assert (hd95["better"], hd95["worse"]) == ("7", "1")  # lower HD95 is better
    shown = next(line for line in lines if line.startswith("| evaluate_ssl | 1 | Dice | case | 8 |"))
    assert f"| {d.mean():+.4f} | [{float(dice['ci_low']):+.4f}, {float(dice['ci_high']):+.4f}] |" in shown
    assert "Wilcoxon" in markdown and "bootstrap" in markdown
    means = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [(r["run"], r["label"], r["runs"]) for r in means] == [
        ("evaluate_base", "1", "2"), ("evaluate_base", "foreground", "2"),
        ("evaluate_ssl", "1", "2"), ("evaluate_ssl", "foreground", "2")]
    assert float(means[0]["dice_std"]) == pytest.approx(np.std([np.mean(DICE[("base", s)]) for s in (0, 1)], ddof=1))
    assert imread(tmp_path / "compare.png").shape[0] > 100


def test_paired_statistics_are_seeded_and_exact_on_enumerable_cases():
    d = np.array([0.1, -0.05, 0.2])
    first, again = paired_statistics(d), paired_statistics(d)
    assert first == again  # seeded: the same CI every time
    # 3 cases: the bootstrap distribution of the mean has 27 equally likely resamples; 10 000 draws put the 2.5 %
    # and 97.5 % percentiles next to its exact quantiles
    exact = np.sort([np.mean(c) for c in itertools.product(d, repeat=3)])
    assert exact[0] <= first["ci_low"] <= exact[2] and exact[-3] <= first["ci_high"] <= exact[-1]
    assert first["p"] == pytest.approx(exact_wilcoxon_p(d))
    none = paired_statistics(np.zeros(4))
    assert math.isnan(none["p"]) and none["mean"] == 0.0
    assert all(math.isnan(v) for v in paired_statistics([]).values())


def test_a_run_missing_a_case_of_the_reference_is_an_error_naming_it(tmp_path):
    dirs = matrix_dirs(tmp_path, drop="case5")
    names = list(dirs)
    # a group is the union of its runs: ssl/0 still has case5, so the pair exists
    compare_runs(list(dirs.values()), tmp_path / "ok", names=names, groups=[n.split("/")[0] for n in names])
    with pytest.raises(UserError, match=r"evaluate_ssl/1 has no case 'case5' that the reference evaluate_base/0"):
        compare_runs(list(dirs.values()), tmp_path / "bad", names=names)


def test_groups_by_pattern():
    assert groups_by_pattern(["evaluate@seed=1", "evaluate@seed=2", "base"], r"seed=\d+") == [
        "evaluate", "evaluate", "base"]
    with pytest.raises(UserError, match="not a valid regular expression"):
        groups_by_pattern(["a"], "(")


def nnunet_summary(cases):
    """An nnU-Net v2 summary.json as nnUNetv2_evaluate_folder writes it (json.dump with NaN literals)."""
    per_case = []
    for case in cases:
        metrics = {str(label): {k: v for k, v in m.items() if k in ("Dice", "IoU", "TP", "FP", "FN", "TN", "n_pred",
                                                                      "n_ref")} for label, m in case["metrics"].items()}
        per_case.append({"metrics": metrics, "prediction_file": f"/nnunet/pred/{case['case_id']}.nii.gz",
                         "reference_file": f"/nnunet/labelsTr/{case['case_id']}.nii.gz"})
    labels = sorted(per_case[0]["metrics"])
    mean = {label: {k: float(np.nanmean([c["metrics"][label][k] for c in per_case]))
                    for k in per_case[0]["metrics"][label]} for label in labels}
    foreground = {k: float(np.mean([mean[label][k] for label in labels])) for k in mean[labels[0]]}
    return {"foreground_mean": foreground, "mean": mean, "metric_per_case": per_case}


def test_an_nnunet_summary_is_a_row_of_its_own_through_the_cli(tmp_path):
    dirs = matrix_dirs(tmp_path)
    cases = [dice_case(name, d) for name, d in zip(CASE_IDS, DICE[("ssl", 0)])]
    cases[2]["metrics"][1] |= {"Dice": NAN, "IoU": NAN, "TP": 0, "FP": 0, "FN": 0, "TN": 100_000, "n_pred": 0,
                               "n_ref": 0}  # both empty: nnU-Net writes NaN
    summary = nnunet_summary(cases)
    (tmp_path / "nnunet").mkdir()
    (tmp_path / "nnunet" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")  # NaN literals
    assert "NaN" in (tmp_path / "nnunet" / "summary.json").read_text(encoding="utf-8")
    result = run_cli("compare", dirs["evaluate_base/0"], dirs["evaluate_base/1"], tmp_path / "nnunet" / "summary.json",
                     "--names", "base@seed=0", "base@seed=1", "nnunet", "--group", r"@seed=\d+",
                     "--reference", "base", "--out", tmp_path / "table")
    row = next(line for line in result.stdout.splitlines() if line.startswith("| nnunet | 1 | 1 |"))
    assert f"| {summary['mean']['1']['Dice']:.4f} |" in row and row.endswith("| 0 | 0 | 1 | 8 |")  # no HD95 at all
    assert "| base | 2 | 1 | 16 |" in result.stdout and "nnU-Net rows have no HD95" in result.stdout
    paired = {r["score"]: r for r in csv.DictReader((tmp_path / "table_paired.csv").open())}
    base = np.mean([DICE[("base", s)] for s in (0, 1)], axis=0)
    d = np.delete(np.array(DICE[("ssl", 0)]) - base, 2)  # the both-empty case has no Dice: left out
    assert paired["Dice"]["pairs"] == "7" and float(paired["Dice"]["mean_difference"]) == pytest.approx(d.mean())
    assert paired["Dice"]["paired_by"] == "case"  # the nnU-Net row names no seed: case means of base's seeds
    assert paired["HD95"]["pairs"] == "0" and paired["HD95"]["wilcoxon_p"] == ""
    missing = run_cli("compare", dirs["evaluate_base/0"], tmp_path / "nope", expect=None)
    assert_one_line_error(missing, "nope", "no summary.json")


def test_compare_two_runs_writes_markdown_csv_and_chart(tmp_path):
    first = write_eval_dir(tmp_path / "runs" / "lora" / "evaluate", CASES)
    second = write_eval_dir(tmp_path / "runs" / "full" / "evaluate", CASES[:1])
    markdown = compare_runs([first, second], tmp_path / "compare", label_names={"1": "brain"},
                            reference="full/evaluate")
    assert (tmp_path / "compare.md").read_text(encoding="utf-8") == markdown
    lines = markdown.splitlines()
    assert lines[0] == ("| run | runs | class | cases | Dice | IoU | NSD (1 mm) | NSD (2 mm) | HD95 (mm) | misses | "
                        "FP on empty | both empty | HD95 n/a |")
    mean_1 = summarize(CASES)["mean"]["1"]
    assert f"| lora/evaluate | 1 | 1 (brain) | {len(CASES)} | {mean_1['Dice']:.4f} | {mean_1['IoU']:.4f} | " \
           f"{mean_1['NSD_1mm']:.4f} | {mean_1['NSD_2mm']:.4f} | {mean_1['HD95']:.2f} | 1 | 0 | 0 | 0 |" in lines
    assert "| lora/evaluate | 1 | 2 | 3 | 0.2500 | 0.2000 | 0.2500 | 0.3000 | 152.50 | 0 | 1 | 1 | 1 |" in lines
    assert "| full/evaluate | 1 | 2 | 1 | 0.5000 | 0.4000 | 0.5000 | 0.6000 | 5.00 | 0 | 0 | 0 | 0 |" in lines
    foreground = next(line for line in lines if line.startswith("| lora/evaluate | 1 | foreground mean |"))
    assert foreground.startswith("| lora/evaluate | 1 | foreground mean | 3 |") and foreground.endswith(
        "| 1 | 1 | 1 | 1 |")
    assert "image diagonal" in lines[2 + 2 * 3 + 1]
    # paired on the one case both runs have: lora's case a equals full's case a
    assert "| lora/evaluate | 1 (brain) | Dice | case | 1 | +0.0000 |" in markdown
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert list(rows[0])[:8] == ["run", "runs", "eval_dirs", "label", "label_name", "cases", "dice", "dice_std"]
    assert [(row["run"], row["label"]) for row in rows] == [
        ("lora/evaluate", "1"), ("lora/evaluate", "2"), ("lora/evaluate", "foreground"),
        ("full/evaluate", "1"), ("full/evaluate", "2"), ("full/evaluate", "foreground")]
    assert float(rows[4]["dice"]) == 0.5 and rows[0]["misses"] == "1" and rows[0]["dice_std"] == ""
    assert imread(tmp_path / "compare.png").shape[0] > 100


def test_compare_takes_class_names_from_the_summaries(tmp_path):
    summary = {**summarize(CASES), "label_names": {"0": "background", "1": "brain", "2": "tumour"}}
    (tmp_path / "ev").mkdir()
    write_json(tmp_path / "ev" / "summary.json", summary)
    markdown = compare_runs([tmp_path / "ev"], tmp_path / "compare")
    assert "| ev | 1 | 1 (brain) |" in markdown and "| ev | 1 | 2 (tumour) |" in markdown


def test_compare_shows_the_common_tolerances_and_reads_older_summaries(tmp_path):
    both = write_eval_dir(tmp_path / "both", CASES)
    only_2 = write_eval_dir(tmp_path / "only_2", CASES, tolerances=2.0)
    markdown = compare_runs([both, only_2], tmp_path / "common")
    assert "| NSD (2 mm) | HD95 (mm) |" in markdown and "NSD (1 mm)" not in markdown
    # a summary written before the rules: one "NSD" score at nsd_tolerance_mm, no case counts, no empty_penalty
    old = json.loads((only_2 / "summary.json").read_text(encoding="utf-8"))
    for means in (*old["mean"].values(), old["foreground_mean"]):
        means["NSD"] = means.pop("NSD_2mm")
        for name in ("n_miss", "n_false_positive", "n_both_empty"):
            means.pop(name, None)
    old["nsd_tolerance_mm"] = old.pop("nsd_tolerances_mm")[0]
    del old["empty_penalty"], old["rules"]
    (tmp_path / "old").mkdir()
    write_json(tmp_path / "old" / "summary.json", old)
    markdown = compare_runs([tmp_path / "old"], tmp_path / "legacy")
    assert f"| {old['mean']['1']['NSD']:.4f} | {old['mean']['1']['HD95']:.2f} | — | — | — | 0 |" in markdown
    assert "before the empty-case rules" in markdown
    with pytest.raises(UserError, match="empty cases differ"):
        compare_runs([both, tmp_path / "old"], tmp_path / "out")


def test_compare_names_and_refuses_bad_summaries(tmp_path):
    good = write_eval_dir(tmp_path / "good", CASES)
    markdown = compare_runs([good], tmp_path / "one", names=["baseline"])
    assert "| baseline | 1 | 1 |" in markdown
    with pytest.raises(UserError, match="missing_run"):
        compare_runs([good, tmp_path / "missing_run"], tmp_path / "out")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="broken_run"):
        compare_runs([good, broken], tmp_path / "out")
    other = write_eval_dir(tmp_path / "other_tolerance", CASES, tolerances=0.5)
    with pytest.raises(UserError, match="no NSD tolerance in common"):
        compare_runs([good, other], tmp_path / "out")
    unpenalised = write_eval_dir(tmp_path / "unpenalised", CASES, empty_penalty=False)
    with pytest.raises(UserError, match="unpenalised: false"):
        compare_runs([good, unpenalised], tmp_path / "out")
    with pytest.raises(UserError, match="one name per folder"):
        compare_runs([good], tmp_path / "out", names=["a", "b"])
    with pytest.raises(UserError, match="run name 'a' is given twice"):
        compare_runs([good, good], tmp_path / "out", names=["a", "a"])
    with pytest.raises(UserError, match="reference 'nobody' is none of the runs"):
        compare_runs([good], tmp_path / "out", reference="nobody")


# --- the pipeline's compare: key ------------------------------------------------------------------------------

STAGES = {"evaluate_base": {"command": "evaluate"}, "evaluate_ssl": {"command": "evaluate"},
          "finetune": {"command": "finetune"}}


def test_pipeline_compare_key_list_and_mapping_forms(tmp_path):
    source = tmp_path / "p.yaml"
    (tmp_path / "nnunet.json").write_text("{}", encoding="utf-8")
    assert parse_compare(["evaluate_base"], source) == (["evaluate_base"], None, ("seed", "fold"))
    spec = {"runs": ["evaluate_base", "evaluate_ssl", "nnunet.json"], "reference": "evaluate_base", "over": ["seed"]}
    assert parse_compare(spec, source) == (spec["runs"], "evaluate_base", ("seed",))
    check_compare(spec, STAGES, source)
    for bad, says in (({"runs": ["finetune"]}, "which is not an evaluate stage"),
                      ({"runs": ["evaluate_ssl"], "reference": "evaluate_base"}, "reference 'evaluate_base' is none"),
                      ({"runs": ["evaluate_ssl"], "refrence": "x"}, "unknown key"),
                      ({"runs": ["missing.json"]}, "is no file"), ({"runs": []}, "compare must be")):
        with pytest.raises(UserError, match=says):
            check_compare(bad, STAGES, source)


def test_pipeline_compare_groups_matrix_cells_over_seeds_and_pairs_against_the_reference(tmp_path):
    dirs = matrix_dirs(tmp_path)
    stages = [SimpleNamespace(name=name, base=name.split("/")[0], cell={"seed": int(name.split("/")[1])}, out=path)
              for name, path in dirs.items()]
    assert group_name(SimpleNamespace(base="evaluate", cell={"strategy": "lora", "seed": 1}), ("seed",), _cell_id) \
        == "evaluate/lora"
    said = []
    spec = {"compare": {"runs": ["evaluate_ssl", "evaluate_base"], "reference": "evaluate_base"}}
    compare_stages(spec, stages, tmp_path / "runs", tmp_path / "p.yaml", _cell_id, said.append)
    assert "| evaluate_ssl | 2 | 1 | 16 |" in said[0] and "against **evaluate_base**" in said[0]
    assert said[0].index("| evaluate_ssl | 2 |") < said[0].index("| evaluate_base | 2 |")  # in the order listed
    # the pipeline names each cell's replicate: seed 0 pairs with the reference's seed 0, 8 cases x 2 seeds
    assert "| evaluate_ssl | 1 | Dice | case @ replicate | 16 |" in (tmp_path / "runs" / "compare.md").read_text(
        encoding="utf-8")


def test_replicates_pair_seed_by_seed_and_fall_back_to_case_means_when_they_differ(tmp_path):
    dirs = matrix_dirs(tmp_path)
    names = list(dirs)
    groups = [name.split("/")[0] for name in names]
    replicates = [f"seed={name.split('/')[1]}" for name in names]
    compare_runs(list(dirs.values()), tmp_path / "by_seed", names=names, groups=groups, reference="evaluate_base",
                 replicates=replicates)
    d = np.concatenate([np.subtract(DICE[("ssl", s)], DICE[("base", s)]) for s in (0, 1)])
    dice = next(r for r in csv.DictReader((tmp_path / "by_seed_paired.csv").open()) if r["score"] == "Dice")
    assert (dice["paired_by"], dice["pairs"]) == ("case @ replicate", "16")
    assert float(dice["mean_difference"]) == pytest.approx(d.mean(), abs=1e-6)
    assert float(dice["wilcoxon_p"]) == pytest.approx(wilcoxon(d).pvalue, rel=1e-4)  # CSV: 6 digits
    assert (dice["better"], dice["worse"], dice["tied"]) == (str((d > 1e-9).sum()), str((d < -1e-9).sum()), "0")
    # the reference lacks seed=1: no seed-by-seed pairing, each case's mean over the seeds instead
    compare_runs(list(dirs.values()), tmp_path / "mixed", names=names, groups=groups, reference="evaluate_base",
                 replicates=[None if name == "evaluate_base/1" else r for name, r in zip(names, replicates)])
    dice = next(r for r in csv.DictReader((tmp_path / "mixed_paired.csv").open()) if r["score"] == "Dice")
    assert (dice["paired_by"], dice["pairs"]) == ("case", "8")
    # through the CLI, --group's match is the replicate
    run_cli("compare", *dirs.values(), "--names", "base@seed=0", "base@seed=1", "ssl@seed=0", "ssl@seed=1",
            "--group", r"@seed=\d+", "--reference", "base", "--out", tmp_path / "cli")
    dice = next(r for r in csv.DictReader((tmp_path / "cli_paired.csv").open()) if r["score"] == "Dice")
    assert (dice["run"], dice["paired_by"], dice["pairs"]) == ("ssl", "case @ replicate", "16")

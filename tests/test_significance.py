"""The paired bootstrap behind the significance table, against an index-resampling bootstrap,
SciPy's and the variance formula; and the table itself from a sweep and from MLflow."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from harness.config import validate_config
from harness.runner import run_sweep
from harness.significance import pack_correct, paired_bootstrap, read_correct, unpack_correct, write_correct
from tests.conftest import TRAINED_TASKS, make_sweep_dict


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 19850])
def test_pack_round_trip(n):
    bits = np.random.default_rng(n).random(n) < 0.4
    packed = pack_correct(bits)
    assert packed.startswith(f"{n}:")
    assert np.array_equal(unpack_correct(packed), bits)


@pytest.mark.parametrize("bad", ["20:AA==", "x:AA==", "0:AAAA", "0:AA=="])
def test_malformed_records_are_refused(bad):
    with pytest.raises(ValueError, match="malformed"):
        unpack_correct(bad)


def correlated_pair(n: int, acc_a: float, acc_b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two models' per-image correctness that agree on most images, as two merges of one model do."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    return u < acc_a, (u + 0.1 * rng.standard_normal(n)) < acc_b


def index_bootstrap(a: dict, b: dict, tasks: list[str], resamples: int, seed: int) -> np.ndarray:
    """The textbook version: resample image indices per task, the same ones for both models."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for t in tasks:
        n = len(a[t])
        idx = rng.integers(0, n, size=(resamples, n))
        total += 100.0 * (a[t][idx].mean(1) - b[t][idx].mean(1))
    return total / len(tasks)


def test_matches_the_index_resampling_bootstrap():
    tasks = ["t1", "t2", "t3"]
    pairs = {t: correlated_pair(n, 0.6, 0.55, i) for i, (t, n) in enumerate(zip(tasks, [300, 500, 800]))}
    a, b = {t: p[0] for t, p in pairs.items()}, {t: p[1] for t, p in pairs.items()}
    d = paired_bootstrap(a, b, tasks, resamples=20000, seed=1)
    ref = index_bootstrap(a, b, tasks, resamples=20000, seed=2)
    lo, hi = np.quantile(ref, [0.025, 0.975])
    assert d.diff == pytest.approx(np.mean([100 * (a[t].mean() - b[t].mean()) for t in tasks]), abs=1e-9)
    assert d.low == pytest.approx(lo, abs=0.15) and d.high == pytest.approx(hi, abs=0.15)
    assert d.images == 1600


def test_matches_scipy_and_the_variance_formula_on_one_task():
    from scipy.stats import bootstrap

    a, b = correlated_pair(1000, 0.7, 0.66, 3)
    d = paired_bootstrap({"t": a}, {"t": b}, ["t"], resamples=20000, seed=4)
    res = bootstrap((a.astype(float), b.astype(float)), lambda x, y: 100 * (x.mean() - y.mean()), paired=True,
                    vectorized=False, n_resamples=20000, method="percentile", random_state=5)
    assert d.low == pytest.approx(res.confidence_interval.low, abs=0.2)
    assert d.high == pytest.approx(res.confidence_interval.high, abs=0.2)
    wins, losses = (a & ~b).mean(), (~a & b).mean()
    sd = 100 * math.sqrt((wins + losses - (wins - losses) ** 2) / 1000)  # the mean of a {-1, 0, +1} variable
    assert (d.high - d.low) / 2 == pytest.approx(1.96 * sd, rel=0.05)


def test_a_whole_byte_of_padding_is_refused_and_seven_bits_are_not():
    """``n`` images pack into ceil(n / 8) bytes: eight spare bits mean the count and the bits disagree."""
    assert pack_correct([]) == "0:" and unpack_correct("0:").size == 0
    assert unpack_correct("1:gA==").tolist() == [True]  # 0x80: the first bit, seven bits of padding
    with pytest.raises(ValueError, match="malformed"):
        unpack_correct("0:gA==")


@pytest.mark.parametrize("level,z", [(0.5, 0.6745), (0.99, 2.5758)])
def test_the_interval_has_the_level_asked_for(level, z):
    """The interval's half-width is z(level) standard errors of the mean of a {-1, 0, +1}
    variable (the normal approximation), not the default 95% one's. 40,000 images, so that the
    lattice of resampled differences (1 / 40,000) is far finer than the interval."""
    a, b = correlated_pair(40_000, 0.7, 0.66, 3)
    d = paired_bootstrap({"t": a}, {"t": b}, ["t"], resamples=20000, level=level, seed=4)
    wins, losses = (a & ~b).mean(), (~a & b).mean()
    sd = 100 * math.sqrt((wins + losses - (wins - losses) ** 2) / 40_000)
    assert (d.high - d.low) / 2 == pytest.approx(z * sd, rel=0.05)


def test_the_same_seed_gives_the_same_result_and_another_seed_another():
    """A report rebuilt from the same records prints the same intervals."""
    a, b = correlated_pair(400, 0.6, 0.55, 8)
    runs = [paired_bootstrap({"t": a}, {"t": b}, ["t"], resamples=2000, seed=s) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert (runs[0].low, runs[0].high, runs[0].p) != (runs[2].low, runs[2].high, runs[2].p)


def test_identical_models_differ_by_nothing():
    a, _ = correlated_pair(500, 0.5, 0.5, 6)
    d = paired_bootstrap({"t": a}, {"t": a.copy()}, ["t"])
    assert (d.diff, d.low, d.high, d.p) == (0.0, 0.0, 0.0, 1.0)


def test_a_clear_gap_is_significant_and_a_noisy_one_is_not():
    rng = np.random.default_rng(7)
    base = rng.random(1000) < 0.5
    better = base | (rng.random(1000) < 0.2)  # right wherever base is, and on ~10% more images
    d = paired_bootstrap({"t": better}, {"t": base}, ["t"])
    assert d.low > 0 and d.p < 0.001
    flip = rng.random(1000) < 0.05  # 5% of images flipped both ways: no systematic difference
    noisy = np.where(flip, ~base, base)
    d2 = paired_bootstrap({"t": noisy}, {"t": base}, ["t"])
    assert d2.low < 0 < d2.high and d2.p > 0.05
    assert paired_bootstrap({"t": base}, {"t": better}, ["t"]).high < 0  # antisymmetric


def test_mismatched_splits_are_refused():
    with pytest.raises(ValueError, match="t: per-image records"):
        paired_bootstrap({"t": np.ones(5, bool)}, {"t": np.ones(6, bool)}, ["t"])


def test_sweep_and_report_write_the_significance_table(trained_checkpoints, tmp_path):
    """Every row against task arithmetic, from the sweep and again from MLflow alone; each
    difference is the difference of the main table's averages."""
    from click.testing import CliRunner

    from harness.cli import main

    d = make_sweep_dict(trained_checkpoints, tmp_path)
    d["tasks"] = list(TRAINED_TASKS)
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    avg = {r.method: r.avg for r in out.rows}
    assert avg["individual"] > avg["pretrained"]  # fine-tuned for real: the differences are not all zero
    header, *body = csv.reader(io.StringIO((out.output_dir / "report" / "significance.csv").read_text()))
    assert header == ["method", "against", "difference", "95% interval", "p", "test images"]
    assert {row[0] for row in body} == set(avg) - {"task_arithmetic"}
    for method, against, diff, interval, _, images in body:
        assert against == "task_arithmetic" and images == "240"
        assert float(diff) == pytest.approx(avg[method] - avg["task_arithmetic"], abs=0.051)
        low, high = (float(x) for x in interval.strip("[]").split(","))
        assert low <= float(diff) <= high
    pretrained = next(row for row in body if row[0] == "pretrained")
    assert float(pretrained[3].strip("[]").split(",")[1]) < 0  # far below task arithmetic: the interval excludes 0
    r = CliRunner().invoke(main, ["report", str(out.output_dir), "--out", str(tmp_path / "rep"),
                                  "--against", "weight_averaging"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    again = (tmp_path / "rep" / "significance.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in again[1:]} == set(avg) - {"weight_averaging"}
    assert all(line.split(",")[1] == "weight_averaging" for line in again[1:])
    bad = CliRunner().invoke(main, ["report", str(out.output_dir), "--against", "nonesuch"])
    assert bad.exit_code == 2 and "--against 'nonesuch': not a row of the main table" in bad.output
    typo = CliRunner().invoke(main, ["report", str(out.output_dir), "--against", "task_arithmetc"])
    assert typo.exit_code == 2
    assert "not a row of the main table; did you mean 'task_arithmetic'?" in " ".join(typo.output.split())


def exact_bootstrap_p(specs: list[tuple[int, int, int]]) -> float:
    """The p-value the bootstrap estimates, enumerated: task ``t`` (``n`` images, ``wins`` and
    ``losses``) resamples to (W, L) ~ Multinomial(n; wins/n, losses/n), and the average
    difference sum_t (W_t - L_t) / n_t is compared with 0 in exact integer units."""
    common = math.lcm(*(n for n, _, _ in specs))
    dist = {0: 1.0}
    for n, wins, losses in specs:
        pmf: dict[int, float] = {}
        for w in range(25):
            for l in range(25):
                logp = (math.lgamma(n + 1) - math.lgamma(w + 1) - math.lgamma(l + 1) - math.lgamma(n - w - l + 1)
                        + w * math.log(wins / n) + l * math.log(losses / n)
                        + (n - w - l) * math.log(1 - (wins + losses) / n))
                key = (w - l) * (common // n)
                pmf[key] = pmf.get(key, 0.0) + math.exp(logp)
        new: dict[int, float] = {}
        for x, px in dist.items():
            for y, py in pmf.items():
                new[x + y] = new.get(x + y, 0.0) + px * py
        dist = new
    below = sum(p for x, p in dist.items() if x <= 0)
    above = sum(p for x, p in dist.items() if x >= 0)
    return min(1.0, 2 * min(below, above))


@pytest.mark.parametrize("specs", [[(1000, 3, 2)] * 8, [(1000, 3, 2), (350, 2, 1), (1000, 2, 2), (350, 1, 2)] * 2])
def test_p_value_counts_exact_ties_on_both_sides(specs):
    """With 1,000 images a task's difference is a multiple of 0.1 point, and a few percent of the
    resampled averages are exactly 0; summed in floating point some came out at +-1e-17 and
    were counted on one side only, which pulled p below what the bootstrap estimates."""
    a, b, tasks = {}, {}, []
    for i, (n, wins, losses) in enumerate(specs):
        t = f"t{i}"
        tasks.append(t)
        a[t], b[t] = np.zeros(n, bool), np.zeros(n, bool)
        a[t][:wins] = True
        b[t][wins:wins + losses] = True
    d = paired_bootstrap(a, b, tasks, resamples=200_000, seed=0)
    assert d.p == pytest.approx(exact_bootstrap_p(specs), abs=0.005)  # standard error about 0.0015


def test_the_eight_paper_test_split_sizes_do_not_overflow_the_exact_sign():
    """The vision-8 test splits' sizes have a common multiple near 2e20: a five-point gap on each
    task in its units is far beyond int64, and a wrapped sum takes a random sign. Every resampled
    difference is then still positive (the gap is many standard errors wide), so p is 0."""
    sizes = [19850, 8041, 6300, 2700, 26032, 12630, 10000, 1880]
    a, b, tasks = {}, {}, []
    for i, n in enumerate(sizes):
        t = f"t{i}"
        tasks.append(t)
        a[t], b[t] = np.zeros(n, bool), np.zeros(n, bool)
        a[t][: 6 * n // 100] = True  # a right alone on 6% of the images
        b[t][6 * n // 100: 7 * n // 100] = True  # b right alone on 1%
    d = paired_bootstrap(a, b, tasks, resamples=2000)
    assert d.diff == pytest.approx(np.mean([100 * (6 * n // 100 - (7 * n // 100 - 6 * n // 100)) / n for n in sizes]))
    assert d.low > 0 and d.p == 0.0


@pytest.mark.parametrize("a,b,tasks", [({}, {}, []), ({"t": np.zeros(0, bool)}, {"t": np.zeros(0, bool)}, ["t"])])
def test_no_tasks_or_an_empty_split_is_refused(a, b, tasks):
    """A division by zero would be the error otherwise, naming neither the task nor the cause."""
    with pytest.raises(ValueError, match="no tasks|t: per-image records"):
        paired_bootstrap(a, b, tasks)


def test_per_image_records_round_trip_through_their_file_and_a_wrong_one_is_refused(tmp_path):
    """A run's file is read back as written; one holding anything but packed records (a number,
    a list) is a ValueError naming the file, not a failure deep inside the report."""
    records = {"t1": pack_correct([True, False, True]), "t2": pack_correct([])}
    path = write_correct(records, tmp_path / "run")
    assert read_correct(path) == records
    for bad in ('{"t1": 3}', '["t1"]', '{"t1": ["1:gA=="]}'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="test_correct.json"):
            read_correct(path)

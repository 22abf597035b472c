"""The benchmarks behind the README's speed and memory claims still run, on tiny inputs, and
their implementations agree with the references they are timed against (timings are printed,
never asserted)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_ties_benchmark_matches_the_dense_reference():
    out = run_benchmark("benchmarks/bench_ties.py", "--small", "--only", "streaming", "dense", "--repeats", "1")
    row = next(line for line in out.splitlines() if line.startswith("TIES literal dense"))
    *_, max_diff, differing = row.split()
    assert float(max_diff) == 0.0 and int(differing) == 0, row
    assert re.search(r"time TIES literal dense / TIES ours \(streaming\): [\d.]+x wall", out), out


def test_wemoe_benchmark_matches_the_per_sample_loop():
    out = run_benchmark("benchmarks/bench_wemoe.py", "--arch", "harness-tiny-vit", "--batch", "2", "--tasks", "2",
                        "--repeats", "1", "--tta-batch", "2")
    row = next(line for line in out.splitlines() if "wemoe (auto)" in line and line.rstrip().endswith("naive loop"))
    rel_diff = float(row.split()[-3])
    assert rel_diff <= 1e-5, row


def test_corruption_benchmark_reads_back_what_it_corrupted():
    out = run_benchmark("benchmarks/bench_corruptions.py", "--corruptions", "contrast", "--images", "4", "--size", "32")
    assert re.search(r"^contrast, \d+ images at 32 px: .* identical: True$", out, re.MULTILINE), out
    assert "the build in 1 process " in out, out  # 10 images: too few to share among processes


def test_stream_benchmark_reads_the_same_batches_in_workers():
    out = run_benchmark("benchmarks/bench_streams.py", "--images", "20", "--source-px", "32", "--streams", "2",
                        "--batch", "4", "--steps", "3")
    assert re.search(r"^in-process .* a stream .*x; identical: True$", out, re.MULTILINE), out
    assert re.search(r"^resume at step 3, .* next batch identical: True$", out, re.MULTILINE), out


def test_precision_benchmark_scores_fp32_against_itself_and_times_bf16():
    out = run_benchmark("benchmarks/bench_precision.py", "--arch", "harness-tiny-vit", "--images", "16", "--batch", "8",
                        "--repeats", "1")
    assert re.search(r"^fp32: [\d.]+ s .*top-1 agreeing with fp32: 100\.0%$", out, re.MULTILINE), out
    assert re.search(r"^bf16: [\d.]+ s .*top-1 agreeing with fp32: [\d.]+%$", out, re.MULTILINE), out
    assert re.search(r"^time fp32 / bf16: [\d.]+x$", out, re.MULTILINE), out


def _fusionbench_fraction(threshold: float) -> float:
    """The fraction of entries FusionBench's ``topk_values_mask`` keeps for a ``threshold``
    (fusion_bench/method/ties_merging/ties_merging_utils.py: ``if K > 1: K /= 100``)."""
    return threshold / 100 if threshold > 1 else threshold


def test_fusionbench_ties_adapter_keeps_k_percent_for_every_k(monkeypatch):
    import types

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fusionbench_ref

    received = []

    class TiesMergingAlgorithm:
        def __init__(self, scaling_factor, threshold, remove_keys, merge_func):
            received.append(threshold)

        def run(self, modelpool):
            return modelpool["_pretrained_"]

    leaf = types.ModuleType("fusion_bench.method.ties_merging.ties_merging")
    leaf.TiesMergingAlgorithm = TiesMergingAlgorithm
    for name in ("fusion_bench", "fusion_bench.method", "fusion_bench.method.ties_merging"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, leaf.__name__, leaf)
    for k in (0.5, 1.0, 20.0, 50.0):
        fusionbench_ref.ties_merging(object(), {}, k, 1.0, "mean")
        assert _fusionbench_fraction(received[-1]) == k / 100, (k, received[-1])


def test_peak_rss_of_a_benchmark_child_is_its_own_not_its_parents():
    # A parent holding 512 MiB (touched) starts a bare interpreter (a few tens of MiB) that
    # reports its peak as the benchmark children do: it must not read the parent's 512 MiB.
    child = "import bench_common; print(bench_common.peak_rss_bytes())"
    parent = (
        "import subprocess, sys\n"
        "held = bytearray(512 * 2**20)\n"
        "for i in range(0, len(held), 4096): held[i] = 1\n"
        f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks"))
    r = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1])
    assert 0 < peak < 256 * 2**20, peak


@pytest.fixture
def rejected(monkeypatch, capsys):
    """Runs a benchmark's ``main()`` on a command line that must stop at argument parsing: exit 2
    with a usage error, whose last line is returned (any other exception fails the test)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))

    def run(script: str, *args: str) -> str:
        module = importlib.import_module(Path(script).stem)
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as stopped:
            module.main()
        assert stopped.value.code == 2, stopped.value.code
        return capsys.readouterr().err.strip().splitlines()[-1]

    return run


@pytest.mark.parametrize("script, option, value", [
    ("bench_ties.py", "--tasks", "0"),
    ("bench_ties.py", "--tasks", "-2"),
    ("bench_wemoe.py", "--batch", "0"),
    ("bench_wemoe.py", "--repeats", "0"),
    ("bench_wemoe.py", "--threads", "0"),
    ("bench_precision.py", "--repeats", "0"),
    ("bench_precision.py", "--batch", "0"),
    ("bench_corruptions.py", "--images", "0"),
    ("bench_streams.py", "--steps", "0"),
    ("bench_streams.py", "--compute-ms", "-5"),
])
def test_benchmarks_reject_sizes_below_one_in_one_line(rejected, script, option, value):
    line = rejected(script, option, value)
    assert f"argument {option}" in line and value in line, line


@pytest.mark.parametrize("script", ["bench_ties.py", "bench_wemoe.py", "bench_precision.py"])
@pytest.mark.parametrize("device", ["gpu0", "meta"])
def test_benchmarks_reject_an_unknown_device_in_one_line(rejected, script, device):
    line = rejected(script, "--device", device)
    assert "argument --device" in line and repr(device) in line, line


@pytest.mark.parametrize("k", ["0", "-5", "150", "nan"])
def test_ties_benchmark_rejects_k_outside_0_to_100_in_one_line(rejected, k):
    line = rejected("bench_ties.py", "--small", "--only", "dense", "--k", k)
    assert "argument --k" in line and k in line, line


@pytest.mark.parametrize("option, value", [("--corruptions", "contrastt"), ("--severity", "6"), ("--severity", "0")])
def test_corruption_benchmark_rejects_an_unknown_corruption_or_severity_in_one_line(rejected, option, value):
    line = rejected("bench_corruptions.py", "--images", "4", "--size", "32", option, value)
    assert f"argument {option}" in line and value in line, line


@pytest.mark.parametrize("args, fragment", [
    (["--sweep", "nope.yaml"], "nope.yaml: file does not exist"),
    (["--sweep", str(ROOT / "sweeps" / "quick.yaml"), "eval.max_sample=3"],
     "eval.max_sample: unknown key; did you mean 'max_samples'?"),
])
def test_sweep_benchmark_rejects_a_bad_sweep_or_override_in_one_line(rejected, args, fragment):
    line = rejected("bench_sweep.py", *args)
    assert line.startswith("bench_sweep.py: error:") and fragment in line, line


def test_sweep_benchmark_names_a_device_this_machine_lacks_in_one_line(rejected, monkeypatch):
    """``device=cuda`` without CUDA passes the sweep's validation and is refused when it starts
    (its preflight): the benchmark printed that as a traceback, not as harness sweep's line."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = rejected("bench_sweep.py", "--sweep", str(ROOT / "sweeps" / "quick.yaml"), "device=cuda")
    assert line == ("bench_sweep.py: error: <command line> (device=cuda, over " + str(ROOT / "sweeps" / "quick.yaml")
                    + "): device: CUDA is not available on this machine, where the jobs run (executor: local); "
                    "use auto or cpu (got 'cuda')"), line


@pytest.mark.parametrize("script, args", [
    ("bench_ties.py", ["--task", "4"]),
    ("bench_wemoe.py", ["--tta-batc", "4"]),
    ("bench_precision.py", ["--precision", "fp32"]),
    ("bench_corruptions.py", ["--image", "4"]),
    ("bench_streams.py", ["--stream", "4"]),
    ("bench_sweep.py", ["--skip"]),
    ("ties_diagnostics.py", [str(ROOT / "sweeps" / "quick.yaml"), "--k", "10"]),
    ("wemoe_diagnostics.py", [str(ROOT / "sweeps" / "quick.yaml"), "--temperature", "1"]),
])
def test_benchmarks_refuse_an_abbreviated_option(rejected, monkeypatch, script, args):
    # argparse's default reads "--task 4" as "--tasks 4": a typo would silently become another
    # option, and the printed numbers would not be those of the command a reader sees.
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    prefix = next(a for a in args if a.startswith("--"))
    assert rejected(script, *args).endswith(f"error: unrecognized arguments: {' '.join(args[args.index(prefix):])}")


@pytest.mark.parametrize("module, prefix", [("tasks.embedded.pipeline", "--task"), ("tasks.embedded.report", "--pool-")])
def test_embedded_pipeline_refuses_an_abbreviated_option(monkeypatch, capsys, module, prefix):
    import torch

    def started(_threads: int) -> None:  # both scripts set their threads once the command line is read
        raise AssertionError(f"{module} read {prefix!r} as an option and started")

    monkeypatch.setattr(torch, "set_num_threads", started)
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main([prefix, "1"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: unrecognized arguments: {prefix} 1")


@pytest.mark.parametrize("script", ["ties_diagnostics.py", "wemoe_diagnostics.py"])
def test_diagnostic_scripts_reject_a_bad_sweep_or_override_in_one_line(rejected, monkeypatch, script):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    assert rejected(script, "nope.yaml") == f"{script}: error: nope.yaml: file does not exist"
    line = rejected(script, str(ROOT / "sweeps" / "quick.yaml"), "eval.max_sample=3")
    assert line.startswith(f"{script}: error:") and "eval.max_sample: unknown key; did you mean 'max_samples'?" in line


def test_precision_benchmark_alternates_the_precisions_in_every_round(monkeypatch, capsys):
    # The README's ratios come from runs in which ours and the reference alternate; a benchmark
    # that timed every fp32 call before any bf16 one would let the machine's load favour one side.
    import harness.evaluation

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_precision

    calls = []
    real = harness.evaluation.correct_predictions

    def recording(*args, precision="fp32", **kwargs):
        calls.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(harness.evaluation, "correct_predictions", recording)
    monkeypatch.setattr(sys, "argv", ["bench_precision.py", "--arch", "harness-tiny-vit", "--images", "8",
                                      "--batch", "8", "--repeats", "3", "--device", "cpu"])
    bench_precision.main()
    assert calls == ["fp32", "bf16"] * 3, calls
    assert re.search(r"^fp32: .*top-1 agreeing with fp32: 100\.0%$", capsys.readouterr().out, re.MULTILINE)


@pytest.mark.parametrize("short", [2, 3])
def test_corruption_benchmark_checks_the_later_jobs_reads_too(short, monkeypatch, capsys):
    # A later job's split (the second call) or the one-process build (the third) that lost its
    # last image must not be reported identical.
    import tasks.corruptions
    from torch.utils.data import Subset

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_corruptions

    real = tasks.corruptions.corrupted_split
    calls = []

    def second_call_short(task, *args, **kwargs):
        calls.append(task)
        ds = real(task, *args, **kwargs)
        return Subset(ds, range(len(ds) - 1)) if len(calls) == short else ds

    monkeypatch.setattr(tasks.corruptions, "corrupted_split", second_call_short)
    monkeypatch.setattr(sys, "argv", ["bench_corruptions.py", "--corruptions", "contrast", "--images", "4",
                                      "--size", "32"])
    bench_corruptions.main()
    out = capsys.readouterr().out
    assert len(calls) == 3 and re.search(r"^contrast, .* identical: False$", out, re.MULTILINE), out


def test_sweep_benchmark_removes_its_cold_cache_and_outputs(monkeypatch, tmp_path, capsys):
    # Each cold run builds a whole cache (hundreds of MB for the embedded suite); the folder the
    # benchmark made for it must be gone when it ends, and the three runs must all have run.
    import tempfile

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_sweep

    written = []

    def fake_run(sweep, overrides):
        for item in overrides:
            key, _, value = item.partition("=")
            if key in ("cache_dir", "output_dir"):
                Path(value).mkdir(parents=True, exist_ok=True)
                (Path(value) / "artifact.bin").write_bytes(b"x" * 1024)
                written.append(Path(value))
        return {"prepare": 1.0, "total": 2.0, "jobs run": 3}

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(bench_sweep, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_sweep.py", "--sweep", "sweeps/quick.yaml"])
    bench_sweep.main()
    assert len(written) == 6 and all(path.is_relative_to(tmp_path) for path in written), written
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))
    assert "rerun/cold total" in capsys.readouterr().out


def test_ties_benchmark_prints_the_others_when_one_implementation_dies(monkeypatch, capsys):
    # The dense reference killed (as the kernel's OOM killer does: exit -9) must not throw away
    # the rows already measured: they print, the failure is named, the exit status is not 0.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_ties

    real_run = subprocess.run

    def dense_killed(cmd, **kwargs):
        if cmd[cmd.index("--child") + 1] == "dense":
            return subprocess.CompletedProcess(cmd, -9, "", "")
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench_ties.subprocess, "run", dense_killed)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setattr(sys, "argv", ["bench_ties.py", "--small", "--only", "streaming", "dense", "ta",
                                      "--repeats", "1"])
    with pytest.raises(SystemExit) as stopped:
        bench_ties.main()
    out = capsys.readouterr().out
    rows = [line.split()[0] + " " + line.split()[1] for line in out.splitlines() if line.startswith(("TIES", "TA"))]
    assert rows == ["TIES ours", "TA ours"], out
    assert "dense failed (exit -9)" in str(stopped.value.code), stopped.value.code


@pytest.mark.parametrize("script, option", [("bench_ties.py", "--model"), ("bench_wemoe.py", "--arch"),
                                            ("bench_precision.py", "--arch")])
def test_benchmarks_reject_an_unknown_architecture_in_one_line(rejected, script, option):
    line = rejected(script, option, "ViT-B-23")
    assert f"argument {option}" in line and "'ViT-B-23'" in line and "did you mean 'ViT-B-32'" in line, line


def test_stream_benchmark_reports_the_readers_a_stream_actually_used(monkeypatch, capsys):
    # 4 images ask for one per EuroSAT class folder: 10 images, no more than the batch of 16, so
    # the stream reads them in this process whatever stream_workers() offers; the row must say so.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_streams

    monkeypatch.setattr(sys, "argv", ["bench_streams.py", "--images", "4", "--source-px", "32", "--streams", "1",
                                      "--batch", "16", "--steps", "2"])
    bench_streams.main()
    out = capsys.readouterr().out
    assert re.search(r"^in-process [\d.]+ s; 0 worker\(s\) a stream .* identical: True$", out, re.MULTILINE), out


def test_precision_benchmark_rejects_a_precision_the_device_lacks_before_building(rejected, monkeypatch):
    import harness.models
    import harness.precision

    def check(precision, device):
        if precision == "fp16":
            raise harness.precision.PrecisionError(f"eval.precision: fp16 does not run on {device}")

    def build_clip(*args, **kwargs):
        raise AssertionError("built the tower before checking the precisions")

    monkeypatch.setattr(harness.precision, "check_precision", check)
    monkeypatch.setattr(harness.models, "build_clip", build_clip)
    line = rejected("bench_precision.py", "--device", "cpu", "--precisions", "fp32", "fp16")
    assert "fp16 does not run on cpu" in line, line


def test_alternating_rounds_rotate_the_order_and_run_a_failed_variant_once(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_common import alternating_rounds

    calls = []

    def run(variant: str):
        calls.append(variant)
        return None if variant == "c" else len(calls)

    assert alternating_rounds(["a", "b", "c"], 3, run) == {"a": [1, 5, 6], "b": [2, 4, 7]}
    assert calls == ["a", "b", "c", "b", "a", "a", "b"]


def test_ties_benchmark_compares_the_medians_of_alternating_runs(monkeypatch, capsys):
    """Each implementation runs ``--repeats`` times in its own process, alternating with the other
    (one timing each, one after the other, let the machine's load bias the ratio): the row shows
    the median times and the highest peak RSS, the ratio is that of the medians."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_ties
    import torch

    from harness.models import save_state_dict

    gib = 1024**3
    walls = {"streaming": [1.0, 9.0, 2.0], "dense": [30.0, 6.0, 8.0]}  # medians 2 and 8
    peaks = {"streaming": [1, 3, 2], "dense": [6, 5, 4]}
    order = []

    def child(cmd, **kwargs):
        impl = cmd[cmd.index("--child") + 1]
        i = order.count(impl)
        order.append(impl)
        save_state_dict({"w": torch.zeros(2)}, cmd[cmd.index("--out") + 1])
        row = {"impl": impl, "device": "cpu", "build_s": 0.0, "merge_s": walls[impl][i],
               "merge_cpu_s": walls[impl][i] / 2, "input_bytes": gib, "base_rss": 0, "rss_before": 0,
               "peak": peaks[impl][i] * gib, "gpu_peak": None, "machine": "test"}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")

    monkeypatch.setattr(bench_ties.subprocess, "run", child)
    monkeypatch.setattr(sys, "argv", ["bench_ties.py", "--small", "--only", "streaming", "dense", "--repeats", "3"])
    bench_ties.main()
    out = capsys.readouterr().out
    assert order == ["streaming", "dense", "dense", "streaming", "streaming", "dense"]
    row = next(line for line in out.splitlines() if line.startswith("TIES ours"))
    assert row.split()[3:5] == ["2.00", "1.00"], row  # median wall and CPU s
    assert "time TIES literal dense / TIES ours (streaming): 4.0x wall, 4.0x cpu; peak RSS ours / theirs 0.50" in out, out


def test_stream_benchmark_compares_the_medians_of_alternating_rounds(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_streams
    import torch

    import harness.evaluation

    times = {0: [6.0, 2.0, 4.0], 2: [1.0, 2.0, 3.0]}  # in-process, two workers a stream: medians 4 and 2
    order = []

    def adapt(ds, args, workers):
        order.append(workers)
        return times[workers][order.count(workers) - 1], [torch.ones(1)], workers

    monkeypatch.setattr(harness.evaluation, "stream_workers", lambda streams: 2)
    monkeypatch.setattr(bench_streams, "adapt", adapt)
    monkeypatch.setattr(sys, "argv", ["bench_streams.py", "--images", "4", "--source-px", "32", "--streams", "1",
                                      "--batch", "4", "--steps", "1", "--repeats", "3"])
    bench_streams.main()
    out = capsys.readouterr().out
    assert order == [0, 2, 2, 0, 0, 2]
    assert "in-process 4.00 s; 2 worker(s) a stream 2.00 s: 2.00x; identical: True" in out, out
    assert re.search(r"^resume at step 1, .* next batch identical: True$", out, re.MULTILINE), out

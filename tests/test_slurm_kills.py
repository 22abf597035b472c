"""Jobs that SLURM itself stops: over their memory, past their time limit.

Two sweeps through the real cluster (``bash scripts/slurm-local.sh start``; memory enforced by
``JobAcctGatherParams=OverMemoryKill``), run side by side: one with 1 GB per job where a job
holds 1.5 GB beside a regular merge, one with a 1-minute limit where a job sleeps past the
limit saving nothing to resume from, beside a WeMoE adaptation that outlasts the limit but
checkpoints. SLURM's smallest limit is a minute and it checks limits every 30 s, so this takes
two to three minutes. The requeue policy and the reasons in words are also checked without a
cluster.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.config import validate_config
from harness.executors.slurm import requeue_only_with_progress
from harness.executors.slurm_reasons import ended_reason
from harness.runner import run_sweep
from tests.test_slurm import SETUP, _sweep, cluster, needs_slurm, varied_checkpoints  # noqa: F401 (fixtures)

WEMOE = {"steps": 12, "checkpoint_every": 2, "batch_size": 4, "lr": 0.01, "routing_stats_batches": 1}
FIRST_ATTEMPT_DELAY = 4.0  # s a step: the first attempt needs 48 s, past any warning SLURM sends it
LIMITED = [{"name": "tests.slurm_kill_methods:Overstays", "label": "overstays"},
           {"name": "tests.slurm_kill_methods:SlowStartWeMoE", "label": "wemoe",
            "params": {**WEMOE, "first_attempt_step_delay": FIRST_ATTEMPT_DELAY}}]
BOUNDED = [{"name": "tests.slurm_kill_methods:EatsMemory", "label": "eats-memory", "params": {"gb": 1.5}},
           {"name": "weight_averaging"}]
OOM_TITLE = "eats-memory(gb=1.5)"


def _flat(text: str) -> str:
    """The console wraps long lines: compare words, not line breaks."""
    return " ".join(text.split())


def _tails(output: str) -> dict[str, str]:
    """The stderr tails a run printed, by SLURM job id (from the log file's name)."""
    return {re.search(r"/(\d+_\d+)_\d+_log\.err\) ---", chunk).group(1): _flat(chunk)
            for chunk in output.split("--- stderr tail (")[1:]}


def _sacct_attempts(job_id: str) -> list[tuple[str, str]]:
    """(State, Elapsed) of every run of a job, requeued runs included, oldest first."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State,Elapsed", "-j", job_id],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line]


def _seconds(elapsed: str) -> int:
    h, m, s = (int(x) for x in elapsed.split("-")[-1].split(":"))
    return 3600 * h + 60 * m + s


def _jobs(out: Path) -> dict:
    return json.loads((out / "slurm" / "submitted.json").read_text())["jobs"]


def _result_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}


@pytest.fixture(scope="module")
def killed(cluster, varied_checkpoints, tmp_path_factory):
    """The time-limited sweep is submitted (--detach) first, its two jobs taking the node's two
    CPUs; the memory-bounded sweep runs (`harness sweep`) and is rerun; then `harness collect`
    waits for the time-limited one. The WeMoE reference (uninterrupted, in this process) runs
    while the first jobs start."""
    root = tmp_path_factory.mktemp("kills")
    runner, env = CliRunner(), {"COLUMNS": "250"}
    t0 = time.monotonic()
    sweeps = {}
    for name, methods, timeout in (("limited", LIMITED, 1), ("bounded", BOUNDED, 5)):
        d = _sweep(varied_checkpoints, root / name, f"toy-{name}", kind="slurm", mem_gb=1, timeout_min=timeout,
                   setup=SETUP, poll_s=1)
        d["references"] = False
        d["methods"] = copy.deepcopy(methods)
        f = root / f"{name}.yaml"
        f.write_text(yaml.safe_dump(d))
        sweeps[name] = {"dict": d, "file": str(f), "out": Path(d["output_dir"])}
    limited, bounded = sweeps["limited"], sweeps["bounded"]
    r = runner.invoke(main, ["sweep", limited["file"], "--detach"], env=env)
    assert r.exit_code == 0 and "submitted 2 jobs" in r.output, r.output

    ref = copy.deepcopy(limited["dict"])
    ref.update(name="toy-kills-ref", output_dir=str(root / "ref"), executor={"kind": "local"})
    ref["methods"] = [{"name": "tests.slurm_kill_methods:SlowStartWeMoE", "label": "wemoe", "params": WEMOE}]
    (reference,) = run_sweep(validate_config(ref), quiet=True).results

    bounded["swept"] = runner.invoke(main, ["sweep", bounded["file"]], env=env)
    bounded["jobs"], bounded["files"] = _jobs(bounded["out"]), _result_files(bounded["out"])
    bounded["rerun"] = run_sweep(validate_config(bounded["dict"]), quiet=True)

    limited["collected"] = runner.invoke(main, ["collect", limited["file"]], env=env)
    limited["jobs"], limited["files"] = _jobs(limited["out"]), _result_files(limited["out"])
    limited["again"] = run_sweep(validate_config(limited["dict"]), quiet=True, mode="collect")
    seconds = time.monotonic() - t0
    print(f"SLURM sweeps with a memory kill, a time-limit kill and a time-limit requeue: {seconds:.1f}s")
    return {**sweeps, "reference": reference, "seconds": seconds}


def _by_label(outcome) -> dict:
    return {r.label: r for r in outcome.results}


@needs_slurm
def test_a_job_over_its_memory_is_reported_out_of_memory_with_its_stderr_tail(killed):
    s = killed["bounded"]
    r, oom_id = s["swept"], s["jobs"][_by_label(s["rerun"])["eats-memory"].key]["history"][0]
    assert r.exit_code == 1, r.output
    summary = _flat(r.output[r.output.index("1 of 2 jobs failed:"):])
    oom = re.search(r"eats-memory\(gb=1\.5\): SLURM job (\S+) OUT_OF_MEMORY: out of memory: "
                    r"used ([\d.]+) GiB of its ([\d.]+) GiB \(raise executor\.mem_gb\); log (\S+)", summary)
    assert oom, summary
    assert oom.group(1) == oom_id and oom.group(4) == str(s["out"] / "slurm" / f"{oom_id}_0_log.err")
    assert float(oom.group(2)) > 1.0 and float(oom.group(3)) == 1.0  # its 1.5 GB against mem_gb=1
    tails = _tails(r.output)
    assert list(tails) == [oom_id], r.output
    assert re.search(r"exceeded memory limit \(\d+ > 1073741824\), being killed", tails[oom_id])
    assert [state for state, _ in _sacct_attempts(oom_id)] == ["FAILED"]


@needs_slurm
def test_a_job_past_its_time_limit_is_reported_timeout_with_its_stderr_tail(killed):
    s = killed["limited"]
    r, timed_id = s["collected"], s["jobs"][_by_label(s["again"])["overstays"].key]["job_id"]
    assert r.exit_code == 1, r.output
    summary = _flat(r.output[r.output.index("1 of 2 jobs failed:"):])
    assert (f"overstays: SLURM job {timed_id} TIMEOUT: time limit reached (1 min) and not requeued: raise "
            "executor.timeout_min, or have the method checkpoint in its workdir; log "
            f"{s['out'] / 'slurm' / timed_id}_0_log.err") in summary, summary
    tails = _tails(r.output)
    assert list(tails) == [timed_id], r.output
    assert re.search(r"CANCELLED AT \S+ DUE TO TIME LIMIT", tails[timed_id])
    assert "time limit near: nothing saved in" in tails[timed_id]  # the job's own note, at SLURM's warning
    assert [state for state, _ in _sacct_attempts(timed_id)] == ["TIMEOUT"]  # ran once: not requeued
    assert "DUE TO TIME LIMIT" in _by_label(s["again"])["overstays"].error_detail


@needs_slurm
def test_other_results_are_kept_and_a_rerun_does_not_recompute_them(killed):
    b, lim = killed["bounded"], killed["limited"]
    rerun = _by_label(b["rerun"])
    assert rerun["weight_averaging"].status == "ok" and rerun["eats-memory"].status == "failed"
    assert "OUT_OF_MEMORY" in rerun["eats-memory"].error  # killed again, the same way
    assert b["rerun"].executed == [rerun["eats-memory"].key]  # only the failed job ran again
    assert set(b["files"]) == {f"{rerun['weight_averaging'].key}.json"}
    assert _result_files(b["out"]) == b["files"]  # the kept result was not rewritten
    jobs = _jobs(b["out"])
    assert len(jobs[rerun["eats-memory"].key]["history"]) == 2
    assert jobs[rerun["weight_averaging"].key] == b["jobs"][rerun["weight_averaging"].key]

    again = _by_label(lim["again"])
    assert set(lim["files"]) == {f"{again['wemoe'].key}.json"} and again["wemoe"].status == "ok"
    assert lim["again"].executed == [again["overstays"].key]
    assert _result_files(lim["out"]) == lim["files"] and _jobs(lim["out"]) == lim["jobs"]


@needs_slurm
def test_timed_out_adaptation_is_requeued_and_resumes_from_its_checkpoint(killed):
    """SLURM's own time-limit warning (nobody signals the job here) makes the adaptation, which has
    checkpointed, requeue; each later process resumes at the last checkpoint, and the result is
    the uninterrupted run's."""
    s = killed["limited"]
    result, ref = _by_label(s["again"])["wemoe"], killed["reference"]
    assert result.status == "ok", result.error
    attempts = _sacct_attempts(s["jobs"][result.key]["job_id"])
    assert len(attempts) >= 2 and [st for st, _ in attempts] == ["REQUEUED"] * (len(attempts) - 1) + ["COMPLETED"]
    assert all(_seconds(elapsed) < 60 for _, elapsed in attempts[:-1])  # requeued before the limit cut it
    assert s["jobs"][result.key]["history"] == [s["jobs"][result.key]["job_id"]]  # requeued, not resubmitted

    log = [ln.split() for ln in (s["out"] / "work" / f"{result.key}.steps.log").read_text().splitlines()]
    pids = list(dict.fromkeys(pid for pid, _, _ in log))
    assert len(pids) == len(attempts), "one process per SLURM run"
    done, every = 0, WEMOE["checkpoint_every"]
    for i, pid in enumerate(pids):
        (start,) = [int(n) for p, kind, n in log if p == pid and kind == "start"]
        steps = [int(n) for p, kind, n in log if p == pid and kind == "step"]
        if i == 0:
            assert start == 0
        else:  # the last checkpoint the previous process wrote (the one before, if cut while writing it)
            assert start % every == 0 and 0 < start <= done and done - start <= every, (start, done)
        assert steps == list(range(start + 1, start + 1 + len(steps)))
        done = steps[-1] if steps else done
    assert done == WEMOE["steps"]

    assert ref.status == "ok"
    assert result.metrics == pytest.approx(ref.metrics, rel=1e-6)
    loss, ref_loss = result.artifacts["curves"]["tta/loss"], ref.artifacts["curves"]["tta/loss"]
    assert len(loss) == WEMOE["steps"] and loss == pytest.approx(ref_loss, rel=1e-6)
    print(f"time-limit requeue: {len(attempts) - 1} requeue(s), resumed at "
          f"{[int(n) for _, kind, n in log if kind == 'start'][1:]} of {WEMOE['steps']} steps; "
          f"both sweeps {killed['seconds']:.1f}s")


# ---------------------------------------------------------------------------------------
# no cluster needed


@pytest.fixture
def fake_submitit_handler():
    """Stands in for submitit's USR2 handler (checkpoint and requeue): records its calls."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(time.monotonic()))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def _warn_and_wait(seconds: float = 0.3) -> None:
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(seconds)  # the handler runs in this thread between bytecodes


def test_a_time_limit_warning_requeues_only_once_something_is_saved(tmp_path, fake_submitit_handler, capfd):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "old-tta.pt").write_bytes(b"from an earlier attempt")
    with requeue_only_with_progress(workdir, timeout_min=1, poll_s=0.05):  # any warning is the limit's
        _warn_and_wait()
        assert fake_submitit_handler == []  # nothing saved since the start: no requeue yet
        assert "nothing saved in" in capfd.readouterr().err
        (workdir / ".wemoe-tta.pt.tmp123").write_bytes(b"a write in progress")
        (workdir / "wemoe-tta.pt.tmp123").write_bytes(b"a write in progress")
        time.sleep(0.3)
        assert fake_submitit_handler == []
        os.replace(workdir / "wemoe-tta.pt.tmp123", workdir / "wemoe-tta.pt")  # a checkpoint lands
        time.sleep(0.5)
        assert len(fake_submitit_handler) == 1  # the watcher re-sent the warning
        _warn_and_wait()
        assert len(fake_submitit_handler) == 2  # saved since the start: requeued at once
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN  # done: nothing left to checkpoint


def test_a_recorded_robustness_evaluation_is_progress_a_requeue_resumes(tmp_path, fake_submitit_handler):
    """A robustness study records each evaluation as it ends in ``work/<key>.robustness/``, and a
    rerun reads them back; a job at its time limit that had recorded some (a follow-up job's study
    saves nothing in its workdir) was not requeued and ended in TIMEOUT, though a requeue would go
    on from them."""
    from harness.cache import atomic_write_json
    from harness.job import study_records

    workdir = tmp_path / "work" / "k"
    with requeue_only_with_progress(workdir, timeout_min=1, poll_s=0.05):  # any warning is the limit's
        atomic_write_json(study_records(workdir) / "gaussian_noise.json",
                          {"severity": 2, "accuracy": {"cars": 50.0}})
        _warn_and_wait()
        assert len(fake_submitit_handler) == 1  # recorded since the start: requeued


def test_a_warning_after_a_failure_is_ignored_too(tmp_path, fake_submitit_handler):
    with pytest.raises(RuntimeError):
        with requeue_only_with_progress(tmp_path, timeout_min=60):
            raise RuntimeError("the job failed")
    _warn_and_wait()
    assert fake_submitit_handler == []  # a failed job is not requeued by a late warning


def test_an_early_warning_is_a_preemption_and_requeues_at_once(tmp_path, fake_submitit_handler):
    with requeue_only_with_progress(tmp_path / "never-created", timeout_min=60):
        _warn_and_wait()
    assert len(fake_submitit_handler) == 1


@pytest.mark.parametrize("returncode, cmd, ends", [
    (-signal.SIGTERM, ["scontrol", "requeue", "91"], SystemExit),  # stopped along with the job
    (1, ["scontrol", "requeue", "91"], subprocess.CalledProcessError),  # refused: the job goes on failing
    (-signal.SIGTERM, ["scontrol", "show", "job"], subprocess.CalledProcessError),  # not the requeue
])
def test_a_requeue_whose_scontrol_is_stopped_with_the_job_exits_as_requeued(tmp_path, capfd, returncode, cmd, ends):
    """``scontrol requeue`` makes SLURM stop every process of the job; on a busy node it stopped
    scontrol before it returned, submitit raised CalledProcessError, and the job wrote a failed
    result ("Command '['scontrol', 'requeue', '91']' died with <Signals.SIGTERM: 15>") that
    `collect` recorded instead of the requeued instance's. It now exits as submitit does after a
    requeue (SystemExit(-1), which the job's ``except Exception`` lets through); any other
    failure of the handler is still raised."""
    def requeue(signum, frame):
        raise subprocess.CalledProcessError(returncode, cmd)

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(ends) as raised:
            with requeue_only_with_progress(tmp_path, timeout_min=60):  # an early warning requeues at once
                _warn_and_wait()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    if ends is SystemExit:
        assert raised.value.code == -1 and not isinstance(raised.value, Exception)
        assert "requeued: scontrol requeue 91 was stopped with this instance" in capfd.readouterr().err


@pytest.mark.parametrize("timeout_min, counted", [(10, False), (1, True)])
def test_only_a_time_limit_warning_counts_against_the_requeues(tmp_path, timeout_min, counted):
    """submitit's handler asks ``has_timed_out`` whether to count a requeue against
    ``executor.requeues``; its own answer (all but 10 min of the limit passed) is yes for any
    warning to a job of 10 min or less. A warning at once is a preemption there (README:
    preemptions are not counted); with a 1 min limit every warning is the limit's."""
    from types import SimpleNamespace

    from submitit.core.job_environment import SignalHandler

    asked = []

    class Recording(SignalHandler):
        def checkpoint_and_try_requeue(self, signum, frame=None):
            asked.append(self.has_timed_out())  # what submitit's own method does first

    handler = Recording(SimpleNamespace(), SimpleNamespace(), SimpleNamespace(_timeout_min=timeout_min))
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        with requeue_only_with_progress(tmp_path, timeout_min=timeout_min, poll_s=0.05):
            (tmp_path / "saved.pt").write_bytes(b"a checkpoint")  # something to resume from
            _warn_and_wait()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert asked == [counted]


def test_without_a_submitit_handler_nothing_is_installed(tmp_path):
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with requeue_only_with_progress(tmp_path, timeout_min=1):
            assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)


# stderr tails as this cluster and a cgroup-enforcing one write them
OVER_MEMORY = ("slurmstepd-localhost: error: StepId=174.0 exceeded memory limit (1405992960 > 1073741824), "
               "being killed\nslurmstepd-localhost: error: Exceeded job memory limit\n"
               "srun: error: localhost: task 0: Killed")
CGROUP_OOM = ("slurmstepd: error: Detected 1 oom-kill event(s) in StepId=88.batch. Some of your processes may "
              "have been killed by the cgroup out-of-memory handler.")


@pytest.mark.parametrize("state, details, tail, expected", [
    ("FAILED", {"Signal": "9"}, OVER_MEMORY,
     ("OUT_OF_MEMORY", "out of memory: used 1.31 GiB of its 1.00 GiB (raise executor.mem_gb)")),
    ("OUT_OF_MEMORY", {}, CGROUP_OOM, ("OUT_OF_MEMORY", "out of memory (raise executor.mem_gb)")),
    ("FAILED", {"Signal": "9"}, OVER_MEMORY.replace("1405992960", "1073745920"),  # sampled 4 KiB over
     ("OUT_OF_MEMORY", "out of memory: used 1.000004 GiB of its 1.000000 GiB (raise executor.mem_gb)")),
    ("TIMEOUT", {"Signal": "15"}, "*** JOB 7 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***",
     ("TIMEOUT", "time limit reached (5 min) and not requeued: raise executor.timeout_min, "
                 "or have the method checkpoint in its workdir")),
    ("FAILED", {"Signal": "9"}, "Killed", ("FAILED", "the job process died (killed by signal 9, SIGKILL)")),
    ("FAILED", {"ExitCode": "3:0"}, "", ("FAILED", "the job process died (exit code 3)")),
])
def test_reasons_in_words(state, details, tail, expected):
    assert ended_reason(state, details, tail, timeout_min=5) == expected


@pytest.mark.parametrize("state, details, tail, expected", [
    ("CANCELLED", {"Signal": "9"}, OVER_MEMORY,  # the memory kill without cgroups, as some clusters record it
     ("OUT_OF_MEMORY", "out of memory: used 1.31 GiB of its 1.00 GiB (raise executor.mem_gb)")),
    ("COMPLETED", {}, "exceeded memory limit (1405992960 > 1073741824)",  # a step over memory, the job not
     ("COMPLETED", "the job ended without writing a result")),
    ("FAILED", {"ExitCode": "1:0"}, OVER_MEMORY + "\nharness: executor.setup.0 failed (exit 137): python prep.py",
     ("OUT_OF_MEMORY", "out of memory: used 1.31 GiB of its 1.00 GiB (raise executor.mem_gb)")),  # memory first
    ("FAILED", {"Signal": "9"}, "slurmstepd: error: Exceeded job memory limit",  # the job's total, no step's line
     ("OUT_OF_MEMORY", "out of memory (raise executor.mem_gb)")),
])
def test_memory_words_make_a_failed_or_cancelled_job_out_of_memory_only(state, details, tail, expected):
    assert ended_reason(state, details, tail, timeout_min=5) == expected

"""SLURM dispatch through submitit, against a real cluster.

The cluster tests need SLURM with accounting (``bash scripts/slurm-local.sh start`` sets up a
single-node one on loopback; ``.ci/run`` does it before the tests). Without ``sinfo`` they skip
with that hint; with ``sinfo`` but a cluster that does not answer they fail. Config checks and
the ``debug`` executor (submitit in-process) need no cluster.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from click.testing import CliRunner

from harness.cli import main
from harness.config import validate_config
from harness.config_errors import ConfigError
from harness.executors.slurm import SweepJob
from harness.executors.slurm_cluster import partition_limit_min, slurm_states
from harness.executors.slurm_settings import check_cluster, submitit_parameters
from harness.runner import run_sweep
from tests.conftest import make_sweep_dict, write_micro_checkpoints

REPO = Path(__file__).resolve().parents[1]
needs_slurm = pytest.mark.skipif(
    shutil.which("sinfo") is None,
    reason="SLURM is not installed (no `sinfo` on PATH); as root, `bash scripts/slurm-local.sh start` "
           "installs and starts a single-node cluster",
)
# every job of these sweeps imports the repository's test methods by path on the node
SETUP = [f"export PYTHONPATH={REPO}"]


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def varied_checkpoints(tmp_path_factory) -> Path:
    """Micro CLIP checkpoints whose 'fine-tuned' encoders differ enough (noise scaled to each
    tensor's spread) that every merge method and setting gets different accuracies: equal
    results across executors then mean the same computation, not the same chance level."""
    return write_micro_checkpoints(tmp_path_factory.mktemp("varied"),
                                   lambda p: p.std() if p.numel() > 1 else torch.tensor(1.0))


def _sweep(checkpoints: Path, root: Path, name: str, **executor) -> dict:
    d = make_sweep_dict(checkpoints, root)
    d["name"] = name
    d["cache_dir"] = str(root.parent / "cache")  # heads are shared by every sweep of the module
    d["executor"] = executor
    return d


FAILING = [{"name": "tests.failing_method:AlwaysFails", "label": "raises"},
           {"name": "tests.slurm_methods:KillsItself", "label": "killed"}]


@pytest.fixture(scope="module")
def local_reference(varied_checkpoints, tmp_path_factory):
    """The reference, computed once when first asked for: the six regular jobs run in this
    process by the local executor (the SLURM fixture asks while its cluster jobs run)."""
    memo = []

    def get():
        if not memo:
            root = tmp_path_factory.mktemp("local") / "sweep"
            cfg = validate_config(_sweep(varied_checkpoints, root, "toy-local", kind="local"))
            memo.append(run_sweep(cfg, quiet=True))
        return memo[0]

    return get


@pytest.fixture
def local_outcome(local_reference):
    return local_reference()


@pytest.fixture(scope="module")
def cluster():
    """The cluster answers and has an idle or mixed node (not skipped: CI has SLURM)."""
    r = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sinfo failed: {r.stderr.strip()} (is slurmctld running? scripts/slurm-local.sh start)"
    assert any(s in r.stdout for s in ("idle", "mixed", "allocated")), f"no usable node: {r.stdout!r}"
    r = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sacct failed ({r.stderr.strip()}): submitit needs accounting (slurmdbd)"


def _drive(cfg_dict: dict) -> None:
    run_sweep(validate_config(cfg_dict), quiet=True)


def _squeue(array_id: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-r", "-h", "-j", array_id, "-o", "%i|%T"], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(line.split("|") for line in out.split())


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def interrupted_sweep(cluster, varied_checkpoints, tmp_path_factory, local_reference):
    """Eight jobs through SLURM (six regular, one that raises, one SIGKILLed): the driver is
    SIGKILLed once it has recorded two results and another job runs; the jobs still queued are
    then cancelled (lost with the driver), the running one is left alone; a second driver
    finishes the sweep."""
    root = tmp_path_factory.mktemp("slurm") / "sweep"
    d = _sweep(varied_checkpoints, root, "toy-slurm", kind="slurm", mem_gb=1, timeout_min=5, setup=SETUP,
               poll_s=1)
    d["methods"] += FAILING
    out = Path(d["output_dir"])
    t0 = time.monotonic()
    driver = mp.get_context("fork").Process(target=_drive, args=(d,))
    driver.start()

    def recorded() -> set[str]:
        return {p.stem for p in (out / "results").glob("*.json")}

    def running_unrecorded() -> bool:  # a job runs whose result the driver has not recorded
        first = json.loads((out / "slurm" / "submitted.json").read_text())["jobs"]
        queue = _squeue(next(iter(first.values()))["job_id"].split("_")[0])
        return any(queue.get(rec["job_id"]) == "RUNNING" and k not in recorded() for k, rec in first.items())

    try:
        local_reference()  # meanwhile
        _wait_for(lambda: len(recorded()) >= 2 and running_unrecorded(), 300, "two results and a running job")
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.join()
    at_kill = recorded()
    first = json.loads((out / "slurm" / "submitted.json").read_text())["jobs"]
    queue = _squeue(next(iter(first.values()))["job_id"].split("_")[0])
    pending = {k for k, rec in first.items() if queue.get(rec["job_id"]) == "PENDING"}
    running = {k for k, rec in first.items() if queue.get(rec["job_id"]) == "RUNNING"} - at_kill
    for k in pending:
        subprocess.run(["scancel", first[k]["job_id"]], check=True)
    # A task cancelled while still inside its array's pending record leaves no record at all
    # (SLURM 22.05: squeue and sacct then do not know it), so "UNKNOWN" is as gone as "CANCELLED".
    _wait_for(lambda: set(slurm_states([first[k]["job_id"] for k in pending]).values()) <= {"CANCELLED", "UNKNOWN"},
              60, "SLURM to drop the cancelled jobs from its queue")
    outcome = run_sweep(validate_config(d), quiet=True)
    final = json.loads((out / "slurm" / "submitted.json").read_text())["jobs"]
    return {"dict": d, "outcome": outcome, "recorded_at_kill": at_kill, "pending": pending, "running": running,
            "first": first, "final": final, "seconds": time.monotonic() - t0}


# ---------------------------------------------------------------------------------------
# configuration


def _executor_error(tmp_path, **executor) -> str:
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = executor
    with pytest.raises(ConfigError) as exc:
        validate_config(d, "sweep.yaml")
    return str(exc.value)


@pytest.mark.parametrize("executor, expected", [
    ({"kind": "slurm", "partiton": "gpu"}, "sweep.yaml: executor.partiton: unknown key"),
    ({"kind": "slurm", "mem_gb": -4}, "sweep.yaml: executor.mem_gb: Input should be greater than 0 (got -4)"),
    ({"kind": "slurm", "cpus_per_task": 0}, "executor.cpus_per_task: Input should be greater than or equal to 1"),
    ({"kind": "slurm", "timeout_min": 0}, "executor.timeout_min: Input should be greater than or equal to 1"),
    ({"kind": "pbs"}, "executor.kind: Input should be 'local', 'slurm' or 'debug' (got 'pbs')"),
    ({"kind": "slurm", "partition": "gpu --qos=high"}, "sweep.yaml: executor.partition: is not one word (it holds "
                                                       "whitespace); the field takes one SLURM name, without spaces "
                                                       "or line breaks (got 'gpu --qos=high')"),
    ({"kind": "slurm", "qos": ""}, "sweep.yaml: executor.qos: is empty; the field takes one SLURM name (leave it "
                                   "out for the cluster's default) (got '')"),
    ({"kind": "slurm", "setup": ["module load cuda\nrm -rf /"]}, "executor.setup: each setup entry must be a single"),
    ({"kind": "slurm", "mem_gb": 0.0005}, "sweep.yaml: executor.mem_gb: under 1 MB, which sbatch would get as "
                                          "--mem=0MB: all of a node's memory (got 0.0005)"),
    ({"kind": "slurm", "requeues": -1}, "executor.requeues: Input should be greater than or equal to 0 (got -1)"),
    ({"kind": "slurm", "sbatch": {"time": 30}}, "sweep.yaml: executor.sbatch: 'time' is set by the harness; use "
                                               "executor.timeout_min"),
    ({"kind": "slurm", "sbatch": {"ntasks-per-node": 2}}, "executor.sbatch: 'ntasks-per-node' is set by the "
                                                         "harness; use nothing (a job runs one task)"),
    ({"kind": "slurm", "sbatch": {"no-requeue": True}}, "executor.sbatch: 'no-requeue' is set by the harness; use "
                                                       "executor.requeues"),
    ({"kind": "slurm", "sbatch": {"parsable": True}}, "executor.sbatch: 'parsable' is set by the harness; use "
                                                     "nothing (the job id is read from sbatch's usual answer)"),
    ({"kind": "slurm", "sbatch": {"test-only": True}}, "executor.sbatch: 'test-only' is set by the harness; use "
                                                      "harness validate or --dry-run"),
    ({"kind": "slurm", "sbatch": {"wait": True}}, "executor.sbatch: 'wait' is set by the harness; use nothing "
                                                 "(the driver waits for the jobs; --detach returns)"),
    ({"kind": "slurm", "sbatch": {"parsab": True}}, "executor.sbatch: 'parsab' abbreviates 'parsable' (sbatch takes "
                                                   "the start of an option's name for it), which is set by the "
                                                   "harness; use nothing"),
    ({"kind": "slurm", "sbatch": {"partit": "gpu"}}, "executor.sbatch: 'partit' abbreviates 'partition' (sbatch "
                                                    "takes the start of an option's name for it), which is set by the "
                                                    "harness; use executor.partition"),
    ({"kind": "slurm", "sbatch": {"--exclude": "n1"}}, "executor.sbatch: '--exclude' is not an sbatch option's long"),
    ({"kind": "slurm", "sbatch": {"comment": "a\n#SBATCH --time=9999"}}, "executor.sbatch: the value of 'comment' "
                                                                         "must be a single line"),
    ({"kind": "slurm", "sbatch": {"exclusive": False}}, "executor.sbatch: the value of 'exclusive' must be a string, "
                                                       "an integer, or true for a flag (got False)"),
])
def test_bad_executor_fields_are_one_line_errors(tmp_path, executor, expected):
    assert expected in _executor_error(tmp_path, **executor)


@pytest.mark.parametrize("executor_lines, expected", [
    ("  exclude: node1\n", "executor.exclude: unknown key; an sbatch option goes under executor.sbatch "
                           "(executor.sbatch.exclude: node1)"),
    ("  exclusive: true\n", "executor.exclusive: unknown key; an sbatch option goes under executor.sbatch "
                            "(executor.sbatch.exclusive: true)"),
    ("  mail-type: [END, FAIL]\n", "executor.mail-type: unknown key; an sbatch option goes under executor.sbatch "
                                   "(executor.sbatch.mail-type: [END, FAIL])"),
    ("  partiton: gpu\n", "executor.partiton: unknown key; did you mean 'partition'?"),  # a near-miss: the typo first
])
def test_an_sbatch_option_beside_the_executor_fields_is_told_where_it_goes(tmp_path, executor_lines, expected):
    """``exclude: node1`` directly under ``executor`` was refused as an unknown key alone, not
    saying that sbatch's own options go under ``executor.sbatch``."""
    from harness.config import load_config

    with pytest.raises(ConfigError) as exc:
        load_config(_sweep_file(tmp_path, executor_lines))
    assert str(exc.value) == f"{tmp_path / 'sweep.yaml'}: {expected}"


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint"])
def test_a_slurm_name_whose_default_holds_a_space_is_refused_naming_the_expanded_value(tmp_path, monkeypatch, field):
    """The check sees the value sbatch would get, after expansion, and says what the field takes
    (not the regular expression of a pattern, nor the value as written only)."""
    from harness.config import load_config

    monkeypatch.delenv("P", raising=False)
    key = f"executor.{field}"
    expected = (f"{key}: expands to 'a b', which is not one word (it holds whitespace); the field "
                "takes one SLURM name, without spaces or line breaks (got '${P:-a b}')")
    for path, args, where in ((_sweep_file(tmp_path, f"  {field}: ${{P:-a b}}\n"), [], "sweep.yaml: "),
                              (_sweep_file(tmp_path, "", "plain.yaml"), [f"{key}=${{P:-a b}}"],
                               f"<command line> ({key}=${{P:-a b}}, over ")):
        with pytest.raises(ConfigError) as exc:
            load_config(path, args)
        assert str(exc.value).count("\n") == 0 and "pattern" not in str(exc.value)
        assert where in str(exc.value) and str(exc.value).endswith(expected)
    monkeypatch.setenv("P", "gpu")
    assert getattr(load_config(_sweep_file(tmp_path, f"  {field}: ${{P:-a b}}\n")).executor, field) == "gpu"


def test_sbatch_options_that_start_no_harness_option_are_kept(tmp_path):
    """--gpus is an option of its own (not an abbreviation of --gpus-per-node); --mail-typ
    abbreviates --mail-type, which the harness leaves to the sweep."""
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "sbatch": {"gpus": 1, "mail-typ": "END", "exclu": "n1"}}
    cfg = validate_config(d, "sweep.yaml")
    assert cfg.executor.sbatch == {"gpus": 1, "mail-typ": "END", "exclu": "n1"}


def _sweep_file(tmp_path: Path, executor_lines: str, name: str = "sweep.yaml") -> Path:
    """A sweep file whose executor block is written as given (YAML as a user types it)."""
    f = tmp_path / name
    f.write_text(yaml.safe_dump(make_sweep_dict(Path("/nonexistent"), tmp_path)) + "executor:\n  kind: slurm\n"
                 + executor_lines)
    return f


@pytest.mark.parametrize("written, minutes", [("2:30:00", 150), ("90:00", 90), ("1:00", 1), ("1-12", 2160),
                                             ("0-1:30", 90), ("1:00:30", 61)])
def test_a_slurm_time_as_timeout_min_is_refused_naming_its_minutes(tmp_path, written, minutes):
    """YAML 1.1 reads an unquoted 2:30:00 as the base-60 number 9000: the job would have run under
    a limit of 9000 minutes (6 days) where SLURM's 2:30:00 means 150."""
    from harness.config import load_config

    expected = f"executor.timeout_min: a number of minutes, not a SLURM time: {written} is timeout_min: {minutes}"
    for path, args in ((_sweep_file(tmp_path, f"  timeout_min: {written}\n"), []),
                       (_sweep_file(tmp_path, "", "plain.yaml"), [f"executor.timeout_min={written}"])):
        with pytest.raises(ConfigError) as exc:
            load_config(path, args)
        assert f"{expected} (got '{written}')" in str(exc.value)


def test_sbatch_values_with_colons_reach_sbatch_as_written(tmp_path):
    """An unquoted `begin: 16:00` is the time SLURM reads, not YAML 1.1's base-60 number 960."""
    from harness.config import load_config

    f = _sweep_file(tmp_path, "  sbatch: {begin: 16:00, time-min: 1:30:00}\n")
    assert load_config(f).executor.sbatch == {"begin": "16:00", "time-min": "1:30:00"}
    assert load_config(f, ["executor.sbatch.begin=17:45"]).executor.sbatch["begin"] == "17:45"


def test_validate_accepts_the_slurm_executor_block(micro_checkpoints, tmp_path, monkeypatch):
    # off a cluster: partition gpu is not checked
    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: None)
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64,
                     "timeout_min": 120, "array_parallelism": 32, "account": None, "qos": None,
                     "constraint": None, "setup": ["module load cuda"]}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "valid" in r.output and "partition: gpu" in r.output
    r = CliRunner().invoke(main, ["validate", str(f), "executor.kind=local", "executor.mem_gb=-1"])
    assert r.exit_code == 2 and "executor.mem_gb" in r.output


GPU_WARNING = ("the jobs run on device {device} but ask SLURM for no GPU (gpus_per_node 0, no GPU gres, "
               "tres-per-task or gpus option under executor.sbatch): where the cluster allocates GPUs they land "
               "without one and fail; set executor.gpus_per_node: 1, or pass a GPU option (executor.sbatch: "
               "{{gres: 'gpu:1'}} or {{gpus: 1}})")


@pytest.mark.parametrize("device, executor, overrides, blamed", [
    ("cuda", {}, [], "{f}: executor.gpus_per_node"),
    ("cpu", {}, ["device=cuda:0"], "<command line> (device=cuda:0, over {f}): device"),
    ("cuda", {"gpus_per_node": 1}, ["executor.gpus_per_node=0"],
     "<command line> (executor.gpus_per_node=0, over {f}): executor.gpus_per_node"),
    ("cuda", {"gpus_per_node": 1}, [], None),
    ("cuda", {"sbatch": {"gres": "gpu:a100:1"}}, [], None),
    ("cuda", {"sbatch": {"gpus-per-task": 1}}, [], None),
    ("cuda", {"sbatch": {"gpus": 2}}, [], None),
    ("cuda", {"sbatch": {"tres-per-t": "gres/gpu:1"}}, [], None),  # the start of --tres-per-task, as sbatch reads it
    ("cuda", {"sbatch": {"tres-per-task": "cpu:4"}}, [], "{f}: executor.gpus_per_node"),
    ("cuda", {"sbatch": {"gres": "tmpdisk:100"}}, [], "{f}: executor.gpus_per_node"),
    ("cuda", {"sbatch": {"gres": "tmpdisk:100,gpu:1"}}, [], None),
    ("auto", {}, [], None),
])
def test_cuda_jobs_asking_slurm_for_no_gpu_are_warned_of(micro_checkpoints, tmp_path, monkeypatch, device, executor,
                                                         overrides, blamed):
    """A cluster that allocates GPUs would place such jobs without one; one that gives GPUs
    unasked runs them, so it is a warning (even with -q), not a refusal, in validate and a sweep."""
    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: None)
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["device"], d["executor"] = device, {"kind": "slurm", **executor}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    for command in (["validate"], ["sweep", "--dry-run", "-q"]):
        r = CliRunner().invoke(main, [*command, str(f), *overrides])
        assert r.exit_code == 0, r.output
        out = " ".join(r.output.split())
        if blamed is None:
            assert "warning" not in out and "no GPU" not in out, out
        else:
            expected = GPU_WARNING.format(device="cuda:0" if "device=cuda:0" in overrides else device)
            assert f"warning {blamed.format(f=f)}: {expected}" in out, out


@pytest.mark.parametrize("name, bad", [("lr_100%x", "'%'"), ("a\\b", "'\\\\'")])
def test_an_output_dir_slurm_would_read_as_a_pattern_is_refused(micro_checkpoints, tmp_path, monkeypatch, name, bad):
    """SLURM expands %x (the job's name) in the log paths under output_dir: the logs' folder then
    does not exist and every job fails before it starts (sacct: FAILED 0:53)."""
    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: None)
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["output_dir"] = str(tmp_path / name)
    d["executor"] = {"kind": "slurm"}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    for command in ("validate", "sweep"):
        r = CliRunner().invoke(main, [command, str(f)])
        assert r.exit_code == 2, r.output
        assert f"{f}: output_dir: holds {bad}, which SLURM reads in the jobs' log paths as a pattern" in r.output
    assert not (tmp_path / name).exists()
    r = CliRunner().invoke(main, ["validate", str(f), "executor.kind=local"])
    assert r.exit_code == 0, r.output


def test_readme_slurm_example_validates(micro_checkpoints, tmp_path):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on SLURM"):]
    block = section[section.index("```yaml") + len("```yaml"): section.index("```", section.index("```yaml") + 7)]
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d.update(yaml.safe_load(block))
    cfg = validate_config(d, "README.md")
    assert cfg.executor.kind == "slurm" and cfg.executor.setup == ["module load cuda"]


def _setup_section(text: str) -> str:
    """The setup lines of a batch script submitit wrote, as one script."""
    lines = text.splitlines()
    return "\n".join(lines[lines.index("# setup") + 1: lines.index("# command")])


def test_sbatch_file_carries_the_executor_settings_and_setup_lines(micro_checkpoints, tmp_path, monkeypatch):
    """What submitit writes for sbatch from our settings: each a quoted #SBATCH flag, each setup
    line run as given in the job's shell."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    setup = ["cd /", "export DATA='/shared/data sets'"]
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64,
                     "timeout_min": 120, "array_parallelism": 32, "account": "proj1", "constraint": "a100&80gb",
                     "setup": setup}
    params = submitit_parameters(validate_config(d))
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun needed to build it
    ex = submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="slurm")
    ex.update_parameters(**params)
    text = _make_sbatch_string(command="python -m x", folder=tmp_path, map_count=100, **ex._executor.parameters)
    lines = text.splitlines()
    for flag in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=64GB", "--time=120",
                 "--account=proj1", "--array=0-99%32", "--signal=USR2@90", "--job-name=harness-toy"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "#SBATCH --constraint='a100&80gb'" in lines
    r = subprocess.run(["bash", "-c", _setup_section(text) + '\necho "$PWD|$DATA"'], capture_output=True, text=True,
                       cwd=tmp_path, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "/|/shared/data sets\n", "")


def test_the_job_step_gets_the_batch_shells_environment(micro_checkpoints, tmp_path, monkeypatch):
    """srun passes the batch shell's environment on even where sbatch --export=NONE told it not to."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "sbatch": {"export": "NONE"}}
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    ex = submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="slurm")
    ex.update_parameters(**submitit_parameters(validate_config(d)))
    text = _make_sbatch_string(command="python -m x", folder=tmp_path, **ex._executor.parameters)
    (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
    assert " --export=ALL " in srun and "#SBATCH --export=NONE" in text.splitlines()


def test_a_failing_setup_line_ends_the_job_naming_it(micro_checkpoints, tmp_path, monkeypatch):
    """`module load` of a module the node lacks must not leave the job running without it: the
    batch script stops at the failing line and says which, and the driver's reason quotes it."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    from harness.executors.slurm_reasons import ended_reason

    setup = ["# comments and quotes pass: '$(touch pwned)'", "export A=1", "false", "touch ran-on"]
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "setup": setup}
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    ex = submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="slurm")
    ex.update_parameters(**submitit_parameters(validate_config(d)))
    text = _make_sbatch_string(command="touch ran-command", folder=tmp_path, **ex._executor.parameters)
    r = subprocess.run(["bash", "-c", text], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert r.returncode == 1 and r.stderr == "harness: executor.setup.2 failed (exit 1): false\n", r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("ran", "pwned"))) == []
    assert ended_reason("FAILED", {"ExitCode": "1:0"}, "module: command not found\n" + r.stderr, 5) == (
        "FAILED", "executor.setup.2 failed (exit 1): false")


def test_further_sbatch_options_are_flags_with_their_values_quoted(micro_checkpoints, tmp_path, monkeypatch):
    import submitit
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "sbatch": {"exclude": "node[3-4]", "exclusive": True, "nice": 10,
                                                 "comment": "run; $(touch x) `id`"}}
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    ex = submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="slurm")
    ex.update_parameters(**submitit_parameters(validate_config(d)))
    lines = _make_sbatch_string(command="python -m x", folder=tmp_path, map_count=2,
                                **ex._executor.parameters).splitlines()
    for line in ("#SBATCH --exclude='node[3-4]'", "#SBATCH --exclusive", "#SBATCH --nice=10",
                 "#SBATCH --comment='run; $(touch x) `id`'"):
        assert line in lines, line


ODD_VALUE = "C:\\data\\n it's \"quoted\" $HOME `id` #1"


def _held_sbatch_script(micro_checkpoints, tmp_path, monkeypatch) -> str:
    """The batch script the harness has submitit write for a sweep whose sbatch values are odd, held."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "sbatch": {"comment": ODD_VALUE, "hold": True}}
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    ex = submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="slurm")
    ex.update_parameters(**submitit_parameters(validate_config(d)))
    return _make_sbatch_string(command="true", folder=tmp_path, **ex._executor.parameters)


def test_backslashes_in_sbatch_values_are_escaped_for_sbatch(micro_checkpoints, tmp_path, monkeypatch):
    """sbatch reads a backslash in an #SBATCH line as an escape, even inside single quotes."""
    lines = _held_sbatch_script(micro_checkpoints, tmp_path, monkeypatch).splitlines()
    assert "#SBATCH --comment='C:\\\\data\\\\n it'\"'\"'s \"quoted\" $HOME `id` #1'" in lines


@needs_slurm
def test_sbatch_gets_odd_values_as_written(cluster, micro_checkpoints, tmp_path, monkeypatch):
    script = tmp_path / "held.sh"
    script.write_text(_held_sbatch_script(micro_checkpoints, tmp_path, monkeypatch))
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30,
                         check=True).stdout.strip().split(";")[0]
    try:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    finally:
        subprocess.run(["scancel", job], check=False)
    assert f"Comment={ODD_VALUE} " in shown or shown.rstrip().endswith(f"Comment={ODD_VALUE}"), shown


@pytest.mark.parametrize("text, minutes", [
    ("infinite", float("inf")), ("30", 30), ("5:00", 5), ("2:30:00", 150), ("1-00:00:00", 1440),
    ("2-12", 3600), ("1-01:30", 1530), ("0:30", 0.5), ("UNLIMITED", float("inf")), ("n/a", float("inf")),
    ("", float("inf")),
])
def test_sinfo_time_limits_in_minutes(text, minutes):
    assert partition_limit_min(text) == minutes


#: What ``cluster_partitions`` reads from ``sinfo`` on a cluster with a default partition ``cpu``
#: (2 h, 16 CPUs, 64000 MB per node) and a ``gpu`` one (1 day, 32 CPUs, 256000 MB).
PARTITIONS = {"cpu": {"limit_min": 120, "cpus": 16, "mem_mb": 64000, "default": True},
              "gpu": {"limit_min": 1440, "cpus": 32, "mem_mb": 256000, "default": False}}


@pytest.mark.parametrize("executor, expected", [
    ({"partition": "gpuu"}, "sweep.yaml: executor.partition: the cluster has no partition 'gpuu'; it has cpu, gpu "
                            "(got 'gpuu')"),
    ({"partition": "gpu,cpus"}, "executor.partition: the cluster has no partition 'cpus'"),
    ({"timeout_min": 121}, "sweep.yaml: executor.timeout_min: over the time limit of partition cpu (the cluster's "
                           "default), 120 min (SLURM would keep the jobs pending) (got 121)"),
    ({"partition": "gpu", "timeout_min": 1441}, "executor.timeout_min: over the time limit of partition gpu, 1440 min"),
    ({"cpus_per_task": 17}, "sweep.yaml: executor.cpus_per_task: more CPUs than a node of partition cpu (the "
                            "cluster's default) has (16)"),
    ({"partition": "gpu", "mem_gb": 251}, "sweep.yaml: executor.mem_gb: more memory than a node of partition gpu "
                                          "has (250.0 GB) (got 251.0)"),
])
def test_executor_settings_a_partition_can_never_run_are_config_errors(tmp_path, executor, expected):
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", **executor}
    with pytest.raises(ConfigError) as exc:
        check_cluster(validate_config(d, "sweep.yaml"), "sweep.yaml", PARTITIONS)
    assert expected in str(exc.value)


@pytest.mark.parametrize("executor", [
    {}, {"partition": "gpu", "timeout_min": 1440, "cpus_per_task": 32, "mem_gb": 250}, {"partition": "cpu,gpu",
                                                                                         "timeout_min": 600},
])
def test_executor_settings_within_the_partitions_limits_pass(tmp_path, executor):
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", **executor}
    check_cluster(validate_config(d, "sweep.yaml"), "sweep.yaml", PARTITIONS)


def _job(micro_checkpoints, tmp_path, method: dict):
    from harness.plan import plan_jobs

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["references"] = {"pretrained": False, "individual": False}
    d["methods"] = [method]
    cfg = validate_config(d)
    (spec,) = plan_jobs(cfg)
    return cfg, spec


def test_a_jobs_log_shows_its_adaptation_progress(micro_checkpoints, tmp_path, capsys):
    """A job's stdout is its SLURM log: it names the job and prints a line per tenth of an
    adaptation, unless the driver is quiet."""
    cfg, spec = _job(micro_checkpoints, tmp_path, {"name": "wemoe", "params": {"steps": 10, "batch_size": 4}})
    for progress in (True, False):
        assert SweepJob(cfg.model_dump(mode="json"), progress)(spec.to_dict())["status"] == "ok"
        out = capsys.readouterr().out
        assert f"harness job wemoe(steps=10, batch_size=4) (key {spec.key})" in out
        assert ("wemoe: 10/10" in out) is progress, out


@pytest.mark.parametrize("threads, want", [("auto", {"merge": 1, "evaluation": 3, "job_cores": 3}),
                                           (2, {"merge": 2, "evaluation": 2, "job_cores": 3})])
def test_a_jobs_threads_come_from_its_cpus_per_task(micro_checkpoints, tmp_path, monkeypatch, threads, want):
    """On its node a job of a small model trains on one thread and evaluates on the CPUs SLURM gave
    it (``SLURM_CPUS_PER_TASK``, not the node's cores), which also bound its readers; ``threads:``
    sets both."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    cfg, spec = _job(micro_checkpoints, tmp_path, {"name": "tests.worker_probe:ThreadProbe"})
    before = torch.get_num_threads()
    try:
        result = SweepJob(dict(cfg.model_dump(mode="json"), threads=threads), False)(spec.to_dict())
    finally:
        torch.set_num_threads(before)
    assert result["status"] == "ok", result["error"]
    assert result["artifacts"]["threads"] == want


def test_a_failed_jobs_stderr_log_holds_its_traceback(micro_checkpoints, tmp_path, capsys):
    cfg, spec = _job(micro_checkpoints, tmp_path, {"name": "tests.failing_method:AlwaysFails", "label": "raises"})
    result = SweepJob(cfg.model_dump(mode="json"))(spec.to_dict())
    err = capsys.readouterr().err
    assert result["status"] == "failed"
    assert "harness job raises failed: RuntimeError: deliberate failure" in err
    assert "Traceback" in err and 'raise RuntimeError("deliberate failure")' in err


def test_a_job_whose_robustness_study_failed_is_retried_and_its_log_says_why(micro_checkpoints, tmp_path, capsys):
    """A job whose in-job robustness study failed comes back with its main metrics; its stderr log
    says the study failed, with the traceback, and its submission is not reused by a rerun (it is
    submitted again, as a failed job is), the job tables showing it failed."""
    from types import SimpleNamespace

    from harness.executors.slurm import _usable_result, outcome
    from harness.job import JobResult
    from harness.plan import plan_jobs

    d = dict(make_sweep_dict(micro_checkpoints, tmp_path), references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast"], "severity": 3},
             methods=[{"name": "tests.faulty_methods:FailsAdaptingOn", "params": {"corruption": "contrast"}}])
    cfg = validate_config(d)
    (spec,) = plan_jobs(cfg)
    result = SweepJob(cfg.model_dump(mode="json"))(spec.to_dict())
    err = capsys.readouterr().err
    assert result["status"] == "ok" and "acc/avg" in result["metrics"]
    said = ("harness job tests.faulty_methods:FailsAdaptingOn(corruption=contrast) finished, its robustness study "
            "failed: RobustnessStudyFailed: robustness study, contrast (severity 3): FloatingPointError: adaptation loss is NaN")
    assert said in err and "Traceback" in err
    pickle_file = tmp_path / "0_result.pkl"  # written by this user, as the job's own result is
    pickle_file.write_bytes(b"")
    for study_error, usable in ((result["study_error"], False), (None, True)):
        back = {**result, "study_error": study_error}
        job = SimpleNamespace(result=lambda back=back: back, paths=SimpleNamespace(result_pickle=pickle_file))
        assert _usable_result(job) is usable
        assert outcome(JobResult.from_dict(back)) == ("done" if usable else "failed")


def _fake_job(folder: Path, job_id: str):
    from types import SimpleNamespace

    paths = SimpleNamespace(stdout=folder / f"{job_id}_0_log.out", stderr=folder / f"{job_id}_0_log.err",
                            result_pickle=folder / f"{job_id}_0_result.pkl")
    return SimpleNamespace(job_id=job_id, paths=paths)


def _ended_without_log(tmp_path, monkeypatch, details: dict[str, str]):
    """The driver's poll of job 7_3, which ended as ``details`` say (sacct's) and wrote no log."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    monkeypatch.setattr(slurm, "sacct_details", lambda job_ids: {i: details for i in job_ids})
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    t = slurm._Tracked(JobSpec("merge", "ta", key="k"), _fake_job(tmp_path, "7_3"), state=details["State"],
                       ended_at=time.monotonic() - 60)
    return t, ex._poll(t)


def test_a_job_cancelled_before_it_started_is_reported_without_a_log(tmp_path, monkeypatch):
    """A queued job cancelled (``scancel`` of the array) never wrote a log: its failure says so
    instead of pointing at a file that does not exist and printing an empty stderr tail."""
    t, result = _ended_without_log(tmp_path, monkeypatch, {"State": "CANCELLED", "ExitCode": "0:0"})
    assert result.status == "failed" and result.error == "SLURM job 7_3 CANCELLED: cancelled before it started"
    assert not t.show_tail


def test_a_job_that_failed_without_opening_its_log_points_at_the_shared_filesystem(tmp_path, monkeypatch):
    """SLURM fails a job whose node cannot open its log file (an output_dir on the login node's own
    disk) before it runs: the reason says where the log should have been and why it may not be."""
    _, result = _ended_without_log(tmp_path, monkeypatch, {"State": "FAILED", "ExitCode": "0:53", "Signal": "53"})
    assert result.status == "failed" and result.error == (
        f"SLURM job 7_3 FAILED: the job process died (killed by signal 53) before it started (could its node "
        f"not write its log in {tmp_path}? output_dir must be on a filesystem the nodes share)")


def test_a_sweep_over_the_clusters_array_size_goes_out_as_several_arrays(tmp_path, monkeypatch):
    """sbatch refuses an array with more tasks than MaxArraySize (1001 by default: 'Invalid job
    array specification'), so a large sweep could not be submitted at all."""
    from types import SimpleNamespace

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    answers = {"scontrol": "MaxArrayCount = 7\nMaxArraySize            = 3\nMaxJobCount = 10000\n"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers.get(cmd[0], ""))
    arrays = []

    class Arrays:
        def map_array(self, fn, args):
            assert len(args) <= 3, "over MaxArraySize"
            arrays.append(len(args))
            return [SimpleNamespace(job_id=f"{len(arrays)}_{i}") for i in range(len(args))]

    monkeypatch.setattr(slurm.SlurmExecutor, "_submitit", lambda self: Arrays())
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    said = ex.submit([JobSpec("merge", f"m{i}", key=f"k{i}") for i in range(7)])
    assert arrays == [3, 3, 1] and said.line.startswith("submitted 7 jobs (SLURM 1, 2, 3), 0 already")
    recorded = {k: rec["job_id"] for k, rec in ex.log.load().items()}
    assert recorded == {"k0": "1_0", "k1": "1_1", "k2": "1_2", "k3": "2_0", "k4": "2_1", "k5": "2_2", "k6": "3_0"}
    assert slurm.max_array_size() == 3
    answers.clear()
    assert slurm.max_array_size() == 1001  # scontrol does not answer: SLURM's default


def _listing(tracked) -> set[str]:
    """The tracked jobs' folders listed, as finding them again lists them."""
    import harness.executors.slurm as slurm

    return slurm.listed_files(p for t in tracked for p in t.paths())


@pytest.mark.parametrize("before, after, change", [
    ({"mem_gb": 1}, {"mem_gb": 2, "poll_s": 5}, "mem_gb 1.0, now 2.0"),
    ({"setup": ["module load a"]}, {"setup": ["module load b"]}, "setup ['module load a'], now ['module load b']"),
], ids=["mem_gb", "setup"])
def test_jobs_found_queued_with_other_settings_are_told_how_to_resubmit(tmp_path, before, after, change):
    """After an OOM the user raises mem_gb and reruns: failed jobs go out again with it, but jobs
    still queued keep the memory they were submitted with, and would fail the same way. So with
    setup lines fixed since: they are in the batch script a queued job was submitted with."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", **before}
    submitted = validate_config(d)
    d["executor"] = {"kind": "slurm", **after}
    ex = slurm.SlurmExecutor(validate_config(d))
    tracked = [slurm._Tracked(JobSpec("merge", f"m{i}", key=f"k{i}"), _fake_job(ex.folder, f"8_{i}")) for i in range(4)]
    ex.log.record({f"k{i}": {"job_id": f"8_{i}", "settings": slurm.job_settings(submitted)} for i in range(3)})
    ex.log.record({"k3": {"job_id": "8_3"}})  # recorded before settings were
    tracked[2].job.paths.result_pickle.write_bytes(b"")  # finished: its settings no longer matter
    assert ex.changed_settings(tracked, _listing(tracked)) == (
        "2 queued or running jobs found from an earlier submission keep the executor settings of that submission "
        f"({change}): `scancel 8_0 8_1` and rerun to submit with these")
    assert ex.changed_settings(tracked[2:], _listing(tracked[2:])) is None


def test_jobs_found_queued_with_other_harness_code_are_told_how_to_resubmit(tmp_path):
    """The harness was updated between ``--detach`` and a rerun: the jobs keep their keys, so they
    are found again, but each one that starts on a node importing other code fails with
    HarnessChanged. Submissions recorded before the code was recorded, finished ones and ones of
    this code are not named."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec, harness_code_id

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    here, now = harness_code_id()
    tracked = [slurm._Tracked(JobSpec("merge", f"m{i}", key=f"k{i}"), _fake_job(ex.folder, f"9_{i}")) for i in range(5)]
    ex.log.record({f"k{i}": {"job_id": f"9_{i}", "harness_dir": "/old/harness", "harness_code": "0ld0ld0ld0ld0ld0"}
                   for i in range(3)})
    ex.log.record({"k3": {"job_id": "9_3"}, "k4": {"job_id": "9_4", "harness_dir": here, "harness_code": now}})
    tracked[2].job.paths.result_pickle.write_bytes(b"")  # finished: it ran with whatever code it found
    assert ex.changed_harness(tracked, _listing(tracked)) == (
        "2 queued or running jobs found from an earlier submission were planned with other harness code "
        f"(/old/harness, code 0ld0ld0ld0ld0ld0; now {here}, code {now}): one that starts on a node importing "
        "other code than that fails with HarnessChanged; `scancel 9_0 9_1` and rerun to submit with this code")
    assert ex.changed_harness(tracked[2:], _listing(tracked[2:])) is None


def test_a_submission_records_the_harness_code_it_was_planned_with(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    class Array:
        def map_array(self, fn, args):
            return [SimpleNamespace(job_id=f"4_{i}") for i in range(len(args))]

    monkeypatch.setattr(slurm.SlurmExecutor, "_submitit", lambda self: Array())
    monkeypatch.setattr(slurm, "max_array_size", lambda: 1001)
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    ex.submit([JobSpec("merge", "m", key="k", harness_dir="/b/harness", harness_code="3c4d")])
    rec = ex.log.load()["k"]
    assert (rec["harness_dir"], rec["harness_code"]) == ("/b/harness", "3c4d")


def test_a_job_out_of_requeues_names_the_fields_to_raise(micro_checkpoints, tmp_path):
    """submitit requeues a job at its time limit ``requeues`` times, then gives up with an error
    the driver reports with what to change."""
    import submitit

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "timeout_min": 30, "requeues": 7}
    cfg = validate_config(d)
    assert slurm.submitit_executor(cfg, tmp_path / "slurm")._executor.max_num_timeout == 7
    job = _fake_job(tmp_path, "7_1")
    job.paths.result_pickle.touch()

    def result():
        raise submitit.core.utils.UncompletedJobError("Job not requeued because: timed-out too many times.")

    job.result = result
    got = slurm.SlurmExecutor(cfg)._poll(slurm._Tracked(JobSpec("merge", "ta", key="k"), job))
    assert got.error == ("SLURM job 7_1 raised: Job not requeued because: timed-out too many times. (7 requeues of "
                         "30 min: raise executor.requeues or executor.timeout_min)")


def test_the_live_table_in_a_log_ends_its_last_line(tmp_path):
    """Where the driver's output is a file (nohup, a SLURM log), what it prints after the table
    starts on a line of its own."""
    import io

    from rich.console import Console

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    buf = io.StringIO()
    console = Console(file=buf, width=120)
    tracked = [slurm._Tracked(JobSpec("merge", "ta", key="k"), _fake_job(tmp_path, "7_0"), outcome="done")]
    with slurm._LiveTable(console, tracked, "slurm"):
        pass
    console.print("next")
    assert "next" in buf.getvalue().splitlines()


def test_why_a_job_pends_is_shown_in_its_state(tmp_path, monkeypatch):
    """squeue's reason of a pending job (a time limit over the partition's never clears) shows
    in the driver's and ``harness status``'s table."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    answers = {"sacct": "", "squeue": "9_0|RUNNING|None\n9_1|PENDING|PartitionTimeLimit\n"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers[cmd[0]])
    reasons: dict[str, str] = {}
    assert slurm_states(["9_0", "9_1"], reasons) == {"9_0": "RUNNING", "9_1": "PENDING"}
    assert reasons == {"9_1": "PartitionTimeLimit"}
    tracked = [slurm._Tracked(JobSpec("merge", f"m{i}", key=str(i)), _fake_job(tmp_path, f"9_{i}"), state=s,
                              reason=reasons.get(f"9_{i}", "")) for i, s in enumerate(("RUNNING", "PENDING"))]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(slurm.job_table(tracked))
    text = console.export_text()
    assert "pending (PartitionTimeLimit)" in text and "running (" not in text


@pytest.mark.parametrize("sig, said", [("9", " (killed by signal 9, SIGKILL)"), ("53", " (killed by signal 53)")])
def test_a_signal_is_named_when_it_has_a_name(sig, said):
    """sacct's 0:53 (a job whose log folder was missing) is no signal Python names: reported by number,
    not a crash of the driver."""
    from harness.executors.slurm_reasons import ended_reason

    assert ended_reason("FAILED", {"Signal": sig, "ExitCode": f"0:{sig}"}, "", 5) == (
        "FAILED", "the job process died" + said)


def test_the_live_table_stays_styled_while_lines_print_under_it(tmp_path):
    """The driver prints each result line with markup off while the live table shows; rich then
    renders the table under the same options: its states must not turn into '[cyan]running[/]',
    and a title's brackets are text."""
    import io

    from rich.console import Console

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    tracked = [slurm._Tracked(JobSpec("merge", "mine[gpu]", key="0"), _fake_job(tmp_path, "9_0"), state="RUNNING"),
               slurm._Tracked(JobSpec("merge", "m1", key="1"), _fake_job(tmp_path, "9_1"), state="PENDING",
                              reason="Resources")]
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    with slurm._LiveTable(console, tracked, "slurm") as live:
        console.print("done m0: acc/avg 1.0 [cyan]", markup=False, highlight=False)
        live.refresh_table()
    text = out.getvalue()
    assert "mine[gpu]" in text and "pending (Resources)" in text and "running" in text
    assert "[cyan]running" not in text and "[dim]" not in text and "[/]" not in text


def test_a_requeued_job_back_in_the_queue_shows_as_requeued(tmp_path):
    """After submitit requeues a job SLURM lists it PENDING (BeginTime) until it restarts: it
    has run (its log exists), so it is requeued, not a job that never started."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    tracked = [slurm._Tracked(JobSpec("merge", f"m{i}", key=str(i)), _fake_job(tmp_path, f"9_{i}"), state="PENDING",
                              reason="BeginTime") for i in range(2)]
    tracked[0].log_path().write_text("harness job m0 (key 0)\n")
    assert [slurm.display_state(t) for t in tracked] == ["requeued", "pending"]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(slurm.job_table(tracked))
    text = console.export_text()
    assert "1 requeued, 1 pending" in text and "requeued (BeginTime)" in text


def _wait_on_one_job(tmp_path, monkeypatch, answers: dict[str, str] | None, polls: int = 5):
    """The driver's wait on job 9_2 (submitted, so far pending) while squeue, sacct and ``scontrol
    ping`` answer as ``answers`` say (a command missing there fails; None: as the commands on
    PATH answer): what it yielded, and whether it was still waiting after ``polls`` polls."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    if answers is not None:
        monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers.get(cmd[0], ""))
    monkeypatch.setattr(slurm, "UNKNOWN_GRACE_S", 0.0)
    slept = []
    real_sleep = slurm.time.sleep

    def sleep(seconds: float) -> None:
        if sys._getframe(1).f_globals["__name__"] != slurm.__name__:  # subprocess's wait on a command
            return real_sleep(seconds)
        slept.append(seconds)
        if len(slept) > polls:
            raise TimeoutError("still waiting")

    monkeypatch.setattr(slurm.time, "sleep", sleep)
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "poll_s": 0.001}
    ex = slurm.SlurmExecutor(validate_config(d))
    t = slurm._Tracked(JobSpec("merge", "ta", key="k"), _fake_job(tmp_path, "9_2"))
    got = []
    try:
        for item in ex._wait([t], None):
            got.append(item)
    except TimeoutError:
        return got, True
    return got, False


def test_a_running_driver_reports_a_job_slurm_no_longer_knows(tmp_path, monkeypatch):
    """An array task cancelled while it waited inside its array's record leaves no trace in squeue
    or sacct: the running driver reports it failed after the grace period (README), where it
    waited on it forever (its last known state, pending, was kept)."""
    up = {"sacct": "", "squeue": "", "scontrol": "Slurmctld(primary) at vm is UP\n"}
    got, waiting = _wait_on_one_job(tmp_path, monkeypatch, up)
    assert not waiting and [(spec.key, r.status) for spec, r in got] == [("k", "failed")]
    assert got[0][1].error.startswith("SLURM job 9_2 is unknown to sacct and squeue (cancelled while queued")


def test_a_lost_job_that_never_ran_has_no_empty_stderr_tail(tmp_path, monkeypatch):
    """A job cancelled in its array's queue never wrote a log: its failure says so rather than
    printing (and keeping as its traceback) an empty stderr tail; one that wrote a log keeps its tail."""
    up = {"sacct": "", "squeue": "", "scontrol": "Slurmctld(primary) at vm is UP\n"}
    (result,) = [r for _, r in _wait_on_one_job(tmp_path, monkeypatch, up)[0]]
    assert result.error_detail == "SLURM job 9_2 is unknown to SLURM and wrote no log"
    (tmp_path / "9_2_0_log.err").write_text("srun: error: node lost\n")
    (result,) = [r for _, r in _wait_on_one_job(tmp_path, monkeypatch, up)[0]]
    assert result.error_detail == f"--- stderr tail ({tmp_path / '9_2_0_log.err'}) ---\nsrun: error: node lost"


def test_a_driver_waits_on_while_slurm_does_not_answer(tmp_path, monkeypatch):
    """squeue, sacct and ``scontrol ping`` failing (the controller and accounting down or
    restarting) say nothing of a job: the driver does not report it lost however long the
    silence lasts, and ``harness status`` does not call it lost."""
    import harness.executors.slurm as slurm

    got, waiting = _wait_on_one_job(tmp_path, monkeypatch, {}, polls=20)
    assert waiting and got == []
    assert slurm_states(["9_2"]) == {"9_2": slurm.NO_ANSWER}
    t = slurm._Tracked(slurm.JobSpec("merge", "ta", key="k"), _fake_job(tmp_path, "9_2"), state=slurm.NO_ANSWER)
    assert slurm.display_state(t) == "pending"
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    ex.log.record({"k": {"job_id": "9_2"}})
    attach, submit, _ = ex._reattach([t.spec])  # a rerun meanwhile: not submitted a second time
    assert [a.job_id for a in attach] == ["9_2"] and submit == []
    monkeypatch.setattr(slurm, "UNKNOWN_GRACE_S", -1.0)  # long past its submission
    table, counts = slurm.status_table(ex.cfg)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    assert counts["lost"] == 0 and counts["pending"] == 1
    assert "pending (SLURM did not answer)" in console.export_text()


def _sweep_of_fake_jobs(tmp_path, monkeypatch, n: int, per_poll: int, no_result: frozenset[int] = frozenset()):
    """The driver's wait on ``n`` jobs of array 100, all pending, of which ``per_poll`` end at
    each poll: they leave squeue, sacct records them COMPLETED (exit code 0), and each writes its result file
    (but those in ``no_result``). Returns what it yielded, and per poll the file-system calls
    (stat, directory listings) and the SLURM commands it made, and how often it drew its table."""
    import collections
    import io

    from rich.console import Console

    import harness.executors.slurm as slurm
    from harness.job import JobResult
    from harness.plan import JobSpec

    folder = tmp_path / "jobs"
    folder.mkdir(parents=True)
    specs = [JobSpec("merge", f"m{i}", key=f"k{i}") for i in range(n)]
    tracked = []
    for i, spec in enumerate(specs):
        job = _fake_job(folder, f"100_{i}")
        job.result = lambda spec=spec: JobResult.of(spec, "done").to_dict()
        tracked.append(slurm._Tracked(spec, job))
    queue = [t.job_id for t in tracked]
    ended: list[str] = []
    polls: list[collections.Counter] = [collections.Counter()]

    def run(cmd: list[str]) -> str:
        polls[-1][cmd[0]] += 1
        if cmd[0] == "squeue":
            return "".join(f"{j}|PENDING|Priority\n" for j in queue)
        if cmd[0] == "sacct":
            return "".join(f"{j}|COMPLETED|0:0\n" for j in ended) + (f"100_[{queue[0].split('_')[1]}-{n - 1}]|PENDING|0:0\n"
                                                                     if queue else "")
        return "Slurmctld(primary) at vm is UP\n"

    def counted(name: str):
        real = getattr(os, name)

        def call(*args, **kwargs):
            polls[-1][name] += 1
            return real(*args, **kwargs)
        return call

    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] % ex.cfg.executor.poll_s == 0:  # a poll is due: jobs end, a new count starts
            for job_id in queue[:per_poll]:
                if int(job_id.split("_")[1]) not in no_result:
                    (folder / f"{job_id}_0_result.pkl").touch()
                ended.append(job_id)
            del queue[:per_poll]
            polls.append(collections.Counter())

    drawn = []
    real_table = slurm.job_table
    monkeypatch.setattr(slurm, "job_table", lambda *a, **k: drawn.append(1) or real_table(*a, **k))
    monkeypatch.setattr("harness.executors.slurm_cluster._run", run)
    monkeypatch.setattr(slurm.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(slurm.time, "sleep", sleep)
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "poll_s": 2}
    ex = slurm.SlurmExecutor(validate_config(d), progress=True, console=Console(file=io.StringIO(), width=200))
    for name in ("stat", "scandir"):
        monkeypatch.setattr(os, name, counted(name))
    try:
        got = [(spec.key, r.status) for spec, r in ex._wait(tracked, None)]
    finally:
        monkeypatch.undo()
    return got, polls, len(drawn)


def test_a_poll_costs_one_folder_listing_however_many_jobs_wait(tmp_path, monkeypatch):
    """Every pass of the wait (each second) looked for each waiting job's result file, and the
    table for each pending job's log: on a shared filesystem, where a stat takes milliseconds, a
    poll of 500 jobs made 3360 file-system calls and the sweep 168000. One listing of the folder
    per poll now tells what is there: a poll's count does not grow with the jobs waiting."""
    fs_calls = {}
    for n in (10, 120):
        got, polls, _ = _sweep_of_fake_jobs(tmp_path / str(n), monkeypatch, n, per_poll=2)
        assert sorted(got) == sorted((f"k{i}", "done") for i in range(n))
        fs_calls[n] = max(p["stat"] + p["scandir"] for p in polls)
    assert fs_calls[120] == fs_calls[10] == 1 + 2  # the listing, and the owner of each result that came


def test_the_live_table_is_drawn_once_a_pass_not_once_a_job(tmp_path, monkeypatch):
    """Each job that ended redrew the table, which goes over every job: O(N) per job ended,
    O(N^2) per sweep (276500 job states worked out for 500 jobs). It is drawn once per pass now,
    when something changed, however many jobs ended in it."""
    got, polls, drawn = _sweep_of_fake_jobs(tmp_path, monkeypatch, 120, per_poll=30)
    assert sorted(got) == sorted((f"k{i}", "done") for i in range(120))
    passes = 2 * (len(polls) - 1)  # poll_s 2: a pass a second
    assert drawn <= passes + 2  # and the first and last frames


def test_accounting_is_asked_only_about_jobs_that_left_the_queue_without_a_result(tmp_path, monkeypatch):
    """Every poll asked sacct (slurmdbd, the query cluster admins ration) about every waiting
    job as well as squeue: 51 sacct calls for a 500-job sweep. squeue is asked once a poll;
    sacct only about jobs it no longer lists whose result has not come, which is how a job that
    ended without one is still reported."""
    got, polls, _ = _sweep_of_fake_jobs(tmp_path / "ok", monkeypatch, 40, per_poll=10)
    assert sorted(got) == sorted((f"k{i}", "done") for i in range(40))
    assert max(p["squeue"] for p in polls) == 1 and sum(p["sacct"] for p in polls) == 0
    got, polls, _ = _sweep_of_fake_jobs(tmp_path / "lost", monkeypatch, 40, per_poll=10, no_result=frozenset({13}))
    assert sorted(got) == sorted((f"k{i}", "failed" if i == 13 else "done") for i in range(40))
    waited = [p for p in polls if p["squeue"] + p["sacct"]]
    assert max(p["squeue"] for p in polls) == 1 and 0 < sum(p["sacct"] for p in polls) <= len(waited)


def test_status_and_a_rerun_list_the_folders_rather_than_stat_each_job(tmp_path, monkeypatch):
    """``harness status`` looked for each job's cached result, result file and log, and a rerun
    for each job's result file three times over: 3 file-system calls per job still queued, 1500
    for 500 such jobs. They list the folders once; a queued job costs none."""
    import collections

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    calls = collections.Counter()

    def counted(name: str):
        real = getattr(os, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(slurm, "UNKNOWN_GRACE_S", -1.0)
    costs = {}
    for n in (4, 60):
        d = make_sweep_dict(Path("/nonexistent"), tmp_path / str(n))
        d["executor"] = {"kind": "slurm"}
        ex = slurm.SlurmExecutor(validate_config(d))
        specs = [JobSpec("merge", f"m{i}", key=f"k{i}") for i in range(n)]
        ex.log.record({s.key: {"job_id": f"100_{i}", "title": s.title, "settings": slurm.job_settings(ex.cfg)}
                       for i, s in enumerate(specs)})
        queued = "".join(f"100_{i}|PENDING|Priority\n" for i in range(n))
        monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: queued if cmd[0] == "squeue" else "")
        with monkeypatch.context() as m:
            for name in ("stat", "scandir"):
                m.setattr(os, name, counted(name))
            calls.clear()
            _, counts = slurm.status_table(ex.cfg)
            status = sum(calls.values())
            calls.clear()
            attach, submit, listed = ex._reattach(specs)
            ex.changed_settings(attach, listed), ex.changed_harness(attach, listed)
            rerun = sum(calls.values())
        assert counts["pending"] == n and len(attach) == n and submit == []
        costs[n] = status, rerun
    assert costs[60] == costs[4], costs


@pytest.mark.parametrize("how", ["submit", "run"])
def test_a_rerun_lists_the_slurm_folder_once_for_its_jobs_and_what_it_tells_of_them(tmp_path, monkeypatch, how):
    """A rerun (``--detach`` or attached) listed the folder of its jobs found again three times:
    to tell finished from queued ones, then again for the warnings on queued jobs of other
    executor settings and of other harness code. One listing now serves all three, and the
    warnings still name exactly the queued jobs of other settings and code, not the finished one."""
    import io

    from rich.console import Console

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "mem_gb": 1}
    before = slurm.job_settings(validate_config(d))
    d["executor"] = {"kind": "slurm", "mem_gb": 2}
    ex = slurm.SlurmExecutor(validate_config(d), progress=True, console=Console(file=io.StringIO(), width=400))
    specs = [JobSpec("merge", f"m{i}", key=f"k{i}") for i in range(4)]
    ex.log.record({"k0": {"job_id": "5_0", "settings": before}, "k1": {"job_id": "5_1", "harness_code": "0ld0ld0ld0ld0ld0"},
                   "k2": {"job_id": "5_2", "settings": before, "harness_code": "0ld0ld0ld0ld0ld0"},
                   "k3": {"job_id": "5_3", "settings": before}})
    monkeypatch.setattr(slurm, "_usable_result", lambda job: True)
    (ex.folder / "5_3_0_result.pkl").write_bytes(b"")  # finished: neither warning names it
    queued = "".join(f"5_{i}|PENDING|Priority\n" for i in range(3))
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: queued if cmd[0] == "squeue" else "")
    monkeypatch.setattr(ex, "_wait", lambda tracked, on_start: iter(()))
    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listings.append(path) or real_scandir(path))
    told = " ".join(ex.submit(specs).warnings) if how == "submit" else (list(ex.run(specs)), ex.console.file.getvalue())[1]
    monkeypatch.undo()
    assert len(listings) == 1, listings
    told = " ".join(told.split())
    assert "keep the executor settings of that submission (mem_gb 1.0, now 2.0): `scancel 5_0 5_2`" in told, told
    assert "other harness code" in told and "`scancel 5_1 5_2` and rerun to submit with this code" in told, told


def test_quiet_runs_still_warn_of_jobs_found_queued_under_other_settings(tmp_path, monkeypatch):
    """``-q`` silences progress only: a rerun that finds its jobs queued under other executor
    settings still says so (those jobs run with the settings they were submitted with), without
    the found-again line that is progress."""
    import io

    from rich.console import Console

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "mem_gb": 1}
    before = slurm.job_settings(validate_config(d))
    d["executor"] = {"kind": "slurm", "mem_gb": 2}
    ex = slurm.SlurmExecutor(validate_config(d), progress=False,
                             console=Console(file=io.StringIO(), quiet=True, width=400))
    ex.log.record({"k0": {"job_id": "5_0", "settings": before}})
    monkeypatch.setattr("harness.executors.slurm_cluster._run",
                        lambda cmd: "5_0|PENDING|Priority\n" if cmd[0] == "squeue" else "")
    monkeypatch.setattr(ex, "_wait", lambda tracked, on_start: iter(()))
    list(ex.run([JobSpec("merge", "m0", key="k0")]))
    told = " ".join(ex.console.file.getvalue().split())
    assert "warning 1 queued or running job" in told and "(mem_gb 1.0, now 2.0): `scancel 5_0`" in told, told
    assert "found again" not in told and "submitted" not in told, told


def test_a_quiet_detach_prints_the_submission_warnings_and_nothing_else(micro_checkpoints, tmp_path, monkeypatch,
                                                                        capsys):
    """``--detach -q`` printed nothing at all, warnings on jobs found queued under other settings
    or code included; the record line and next steps are progress, the warnings are not."""
    import harness.executors.slurm as slurm
    from harness.runner import run_sweep

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm"}
    monkeypatch.setattr(slurm.SlurmExecutor, "submit", lambda self, specs: slurm.Submission(
        f"submitted {len(specs)} jobs (SLURM 7), 0 already queued; record: x", ["jobs 7_0 planned with other code"]))
    for quiet in (True, False):
        run_sweep(validate_config(d), quiet=quiet, mode="detach")
        err = " ".join(capsys.readouterr().err.split())
        assert "warning jobs 7_0 planned with other code" in err, (quiet, err)
        assert ("record: x" in err and "harness collect" in err) is not quiet, (quiet, err)


def _fake_slurm_on_path(tmp_path, monkeypatch, squeue: str) -> None:
    """``squeue`` runs the shell code ``squeue``; ``sacct`` answers with no record (accounting
    lagging or off) and ``scontrol ping`` says the controller is up."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"squeue": squeue, "sacct": "exit 0",
                       "scontrol": 'echo "Slurmctld(primary) at vm is UP"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("squeue", [
    'echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2; exit 1',
    "sleep 5",  # past the command timeout
])
def test_a_failing_squeue_is_no_evidence_that_a_job_is_gone(tmp_path, monkeypatch, squeue):
    """squeue failing or timing out (an overloaded controller) while ``scontrol ping`` answers says
    nothing of a job sacct has no record of yet: the driver waits on it however long that lasts,
    where it reported it lost after the grace period, and ``harness status`` does not call it lost."""
    import harness.executors.slurm as slurm

    _fake_slurm_on_path(tmp_path, monkeypatch, squeue)
    monkeypatch.setattr("harness.executors.slurm_cluster.COMMAND_TIMEOUT_S", 0.5)
    assert slurm_states(["9_2"]) == {"9_2": slurm.NO_ANSWER}
    got, waiting = _wait_on_one_job(tmp_path, monkeypatch, None, polls=3)
    assert waiting and got == []
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    ex.log.record({"k": {"job_id": "9_2"}})
    monkeypatch.setattr(slurm, "UNKNOWN_GRACE_S", -1.0)  # long past its submission
    _, counts = slurm.status_table(ex.cfg)
    assert counts["lost"] == 0 and counts["pending"] == 1


def test_squeue_saying_it_does_not_know_the_job_is_an_answer(tmp_path, monkeypatch):
    """Asked about one job id the controller no longer holds, squeue exits 1 with 'Invalid job id
    specified': the controller answered, so a job sacct does not know either is reported lost."""
    _fake_slurm_on_path(tmp_path, monkeypatch,
                        'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    assert slurm_states(["9_2"]) == {"9_2": "UNKNOWN"}
    got, waiting = _wait_on_one_job(tmp_path, monkeypatch, None)
    assert not waiting and [(spec.key, r.status) for spec, r in got] == [("k", "failed")]
    assert got[0][1].error.startswith("SLURM job 9_2 is unknown to sacct and squeue")


@needs_slurm
def test_validate_names_a_partition_the_cluster_lacks(cluster, micro_checkpoints, tmp_path):
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm"}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "--dry-run", "executor.partition=no-such-partition"])
    assert r.exit_code == 2, r.output
    assert (f"<command line> (executor.partition=no-such-partition, over {f}): executor.partition: the cluster "
            "has no partition 'no-such-partition'") in " ".join(r.output.split())


# ---------------------------------------------------------------------------------------
# a real cluster


@needs_slurm
def test_slurm_results_equal_the_local_executors(interrupted_sweep, local_outcome):
    outcome = interrupted_sweep["outcome"]
    assert len(outcome.results) == 8 and len(local_outcome.results) == 6
    by_key = {r.key: r for r in outcome.results}
    for ref in local_outcome.results:
        got = by_key[ref.key]
        assert got.status == "ok", (got.title, got.error)
        assert got.metrics == ref.metrics, ref.title
    assert len({r.metrics["acc/avg"] for r in local_outcome.results}) > 2  # the comparison can tell jobs apart
    # the two failing methods keep their rows, without numbers, after the local run's
    assert [(r.method, r.avg) for r in outcome.rows] == [(r.method, r.avg) for r in local_outcome.rows] + [
        (m["label"], None) for m in FAILING]


def _grid_alone(d: dict) -> dict:
    """The sweep's grid method alone, no reference rows, with a robustness study of one corruption."""
    methods = [m for m in d["methods"] if "grid" in m]
    robustness = {"tasks": ["toy_stripes"], "corruptions": ["contrast"]}
    return dict(d, methods=methods, references=False, robustness=robustness)


@needs_slurm
def test_robustness_follow_up_runs_on_the_cluster(cluster, varied_checkpoints, tmp_path):
    """A grid method's robustness job is submitted after its grid, and equals the local one."""
    runs = {}
    for kind, executor in (("local", {"kind": "local"}),
                           ("slurm", {"kind": "slurm", "mem_gb": 1, "timeout_min": 5, "setup": SETUP, "poll_s": 1})):
        d = _grid_alone(_sweep(varied_checkpoints, tmp_path / kind / "sweep", f"toy-rob-{kind}", **executor))
        runs[kind] = run_sweep(validate_config(d), quiet=True)
    (local,) = [r for r in runs["local"].results if r.kind == "robustness"]
    (remote,) = [r for r in runs["slurm"].results if r.kind == "robustness"]
    assert remote.status == "ok" and remote.key == local.key and remote.metrics == local.metrics
    submitted = json.loads((Path(runs["slurm"].output_dir) / "slurm" / "submitted.json").read_text())["jobs"]
    assert submitted[remote.key]["kind"] == "robustness"


@needs_slurm
def test_a_pruned_trial_shows_as_done_and_collected(cluster, varied_checkpoints, tmp_path):
    """A trial its pruner stopped ended as asked and its result was recorded: the driver's job
    table and ``harness status`` show it done and collected, as the study has it, not as a
    failed job with an error log to read."""
    import io

    import optuna
    from rich.console import Console

    from harness.executors.slurm import status_table
    from harness.tuning import open_storage, storage_spec

    d = dict(_sweep(varied_checkpoints, tmp_path / "sweep", "toy-pruned", kind="slurm", mem_gb=1, timeout_min=5,
                    setup=SETUP, poll_s=1), references=False)
    d["methods"] = [{"name": "tests.tuning_methods:StopsOrFailsByQuality", "label": "q", "tune": {
        "n_trials": 2, "n_parallel": 2, "sampler": "grid",
        "space": {"quality": {"type": "categorical", "choices": [10.0, 50.0]}}}}]
    cfg = validate_config(d)
    text = io.StringIO()
    run_sweep(cfg, console=Console(file=text, width=250))
    study = optuna.load_study(study_name="toy-pruned.q", storage=open_storage(storage_spec(cfg, cfg.methods[0].tune)))
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "PRUNED"]
    rows = [line for line in text.getvalue().splitlines() if "q(quality=10.0)" in line and "│" in line]
    assert rows and all("│ done " in row and "failed" not in row for row in rows), text.getvalue()
    _, counts = status_table(cfg)
    assert (counts["failed"], counts["done"], counts["collected"]) == (0, 3, 3), counts


@needs_slurm
def test_collect_keeps_the_row_of_a_finished_study(cluster, varied_checkpoints, tmp_path):
    """``collect`` runs no study, but one an attached sweep finished keeps its row (its best
    setting's cached result and trial counts) in the tables and MLflow: collecting the sweep's
    other jobs deleted the row from ``report/`` and its summary metric from the parent run. A
    study not done (its ``n_trials`` raised since) is left out, as the command says."""
    import io

    from rich.console import Console

    d = dict(_sweep(varied_checkpoints, tmp_path / "sweep", "toy-collect-tuned", kind="slurm", mem_gb=1,
                    timeout_min=5, setup=SETUP, poll_s=1), references=False)
    d["methods"] = [{"name": "task_arithmetic", "label": "tuned", "tune": {
        "n_trials": 2, "n_parallel": 2, "sampler": "random",
        "space": {"scaling": {"type": "float", "low": 0.3, "high": 0.8}}}}]
    cfg = validate_config(d)
    run_sweep(cfg, quiet=True)
    main_md = cfg.resolved_output_dir() / "report" / "main.md"
    attached = [line for line in main_md.read_text().splitlines() if line.startswith("| tuned |")]
    assert len(attached) == 1, main_md.read_text()

    def summary() -> dict[str, float]:
        client = MlflowClient(cfg.resolved_tracking_uri())
        exp = client.get_experiment_by_name(cfg.name).experiment_id
        (parent,) = client.search_runs([exp], "tags.`harness.kind` = 'sweep'")
        return parent.data.metrics

    before = summary()["tuned/acc/avg"]
    text = io.StringIO()
    run_sweep(cfg, console=Console(file=text, width=250), mode="collect")
    assert "collect runs no Optuna study" not in text.getvalue(), text.getvalue()
    assert [line for line in main_md.read_text().splitlines() if line.startswith("| tuned |")] == attached
    assert summary()["tuned/acc/avg"] == before
    d["methods"][0]["tune"]["n_trials"] = 3
    text = io.StringIO()
    run_sweep(validate_config(d), console=Console(file=text, width=250), mode="collect")
    assert "collect runs no Optuna study: run `harness sweep`" in text.getvalue(), text.getvalue()
    assert "| tuned |" not in main_md.read_text()


@needs_slurm
def test_detached_sweeps_submit_and_collect_the_robustness_follow_up(cluster, varied_checkpoints, tmp_path):
    """``--detach`` submits a grid method's robustness job once its grid is cached, ``collect``
    gathers it (and says when it still has to be submitted), it equals the local one, and a
    later ``--detach`` submits it no more."""
    import io

    from rich.console import Console

    local = run_sweep(validate_config(_grid_alone(_sweep(varied_checkpoints, tmp_path / "local" / "sweep",
                                                        "toy-drob-local", kind="local"))), quiet=True)
    (truth,) = [r for r in local.results if r.kind == "robustness"]
    cfg = validate_config(_grid_alone(_sweep(varied_checkpoints, tmp_path / "slurm" / "sweep", "toy-drob-slurm",
                                            kind="slurm", mem_gb=1, timeout_min=5, setup=SETUP, poll_s=1)))

    def said(mode: str):
        text = io.StringIO()
        outcome = run_sweep(cfg, console=Console(file=text, width=250), mode=mode)
        return outcome, " ".join(text.getvalue().split())

    submitted = Path(cfg.resolved_output_dir()) / "slurm" / "submitted.json"
    said("detach")  # the grid
    n = len(json.loads(submitted.read_text())["jobs"])
    outcome, text = said("collect")
    assert f"collecting {n} submitted jobs (SLURM " in text and "submitted 0" not in text, text  # collect sends none
    assert f"0 cached, {n} not recorded yet -> " in text and " to run" not in text, text  # nor says it runs any
    assert not [r for r in outcome.results if r.kind == "robustness"]
    assert "1 robustness job (settings chosen on val) not submitted yet" in text
    _, text = said("detach")
    assert "submitted 1 job " in text
    kinds = [job["kind"] for job in json.loads(submitted.read_text())["jobs"].values()]
    assert kinds.count("robustness") == 1
    outcome, text = said("collect")
    (got,) = [r for r in outcome.results if r.kind == "robustness"]
    assert got.status == "ok" and got.key == truth.key and got.metrics == truth.metrics
    assert "not submitted yet" not in text
    _, text = said("detach")  # everything collected: nothing is sent again, the follow-up neither
    assert "submitted no jobs" in text, text
    kinds = [job["kind"] for job in json.loads(submitted.read_text())["jobs"].values()]
    assert kinds.count("robustness") == 1


@needs_slurm
def test_collect_after_editing_a_detached_method_says_its_jobs_ran_other_code(cluster, varied_checkpoints, tmp_path,
                                                                            monkeypatch):
    """After ``--detach``, an edit of a method of one's own changes its jobs' keys: ``collect``
    says those jobs were submitted with other code of that method, not that they were never
    submitted; a job never submitted is still told as such."""
    import io

    from rich.console import Console

    from tests.test_plugin_methods import _write_module

    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, 0.0)
    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-edited", kind="slurm", mem_gb=1, timeout_min=5,
               setup=[*SETUP, f"export PYTHONPATH=$PYTHONPATH:{tmp_path}"], poll_s=1)
    d["references"] = False
    d["methods"] = [{"name": "scaled_sum:ScaledSum", "label": "mine", "grid": {"tag": [0, 1]}}]

    def said(mode: str) -> str:
        text = io.StringIO()
        run_sweep(validate_config(d), console=Console(file=text, width=250), mode=mode)
        return " ".join(text.getvalue().split())

    assert "submitted 2 jobs " in said("detach")
    _write_module(tmp_path, 0.6)
    d["methods"][0]["grid"]["tag"] = [0, 1, 2]
    text = said("collect")
    assert ("2 jobs were submitted with other code of the method scaled_sum:ScaledSum (its file changed since; on the "
            "cluster they fail with MethodChanged or TaskChanged): run `harness sweep` to run them with the current "
            "code") in text, text
    assert "1 job was never submitted (run `harness sweep` for it)" in text, text


def test_jobs_submitted_with_other_code_are_told_by_what_changed(tmp_path):
    """Which recorded submission a spec with an unknown key is (same kind and title), and whether
    its method or which task of one's own changed; submissions recorded without code identities
    (an older harness) are not told apart."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    ex.log.record({
        "old1": {"job_id": "1_0", "title": "mine(tag=0)", "kind": "merge", "method_id": "m:M@aaa", "task_code": {}},
        "old2": {"job_id": "1_1", "title": "mine(tag=1)", "kind": "merge", "method_id": "m:M@bbb",
                 "task_code": {"t:make": "c1"}},
        "old3": {"job_id": "1_2", "title": "mine(tag=2)", "kind": "merge"},
    })
    specs = [JobSpec("merge", "mine", "m:M", {"tag": i}, key=f"new{i}", method_id="m:M@bbb",
                     task_code={"t:make": "c2"}) for i in range(4)]
    assert ex.changed_code(specs) == {"new0": "method m:M and task 't:make'", "new1": "task 't:make'"}


@needs_slurm
def test_failed_jobs_are_reported_with_reason_and_stderr_tail(interrupted_sweep):
    outcome = interrupted_sweep["outcome"]
    failed = {r.label: r for r in outcome.failed}
    assert set(failed) == {"raises", "killed"}
    assert failed["raises"].error == "RuntimeError: deliberate failure"
    assert "deliberate failure" in failed["raises"].error_detail  # the traceback
    killed = failed["killed"]
    final = interrupted_sweep["final"][killed.key]["job_id"]
    assert killed.error.startswith(f"SLURM job {final} FAILED: the job process died")
    assert "killed by signal 9, SIGKILL" in killed.error
    assert f"log {Path(interrupted_sweep['dict']['output_dir']) / 'slurm' / final}_0_log.err" in killed.error
    assert "stderr tail" in killed.error_detail and "Killed" in killed.error_detail
    results_dir = Path(interrupted_sweep["dict"]["output_dir"]) / "results"
    assert {p.stem for p in results_dir.glob("*.json")} == {r.key for r in outcome.results if r.status == "ok"}


@needs_slurm
def test_a_result_names_the_slurm_job_and_logs_it_ran_in(interrupted_sweep):
    """From a result file or an MLflow run to the job's log: the SLURM job id and its stdout and
    stderr logs are recorded with every result a job returned, and tagged on its run."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import JOB_TAG

    out = Path(interrupted_sweep["dict"]["output_dir"])
    final = interrupted_sweep["final"]
    client = MlflowClient(validate_config(interrupted_sweep["dict"]).resolved_tracking_uri())
    runs = {r.data.tags.get(JOB_TAG): r.data.tags
            for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    for r in interrupted_sweep["outcome"].results:
        job = final[r.key]["job_id"]
        want = {"slurm_job_id": job, "log": str(out / "slurm" / f"{job}_0_log.out"),
                "error_log": str(out / "slurm" / f"{job}_0_log.err")}
        assert r.ran_on == want, r.title
        assert Path(want["log"]).is_file()
        tags = runs[r.key]
        assert (tags["harness.slurm_job_id"], tags["harness.log"]) == (job, want["log"]), r.title
    stored = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    assert stored and all(d["ran_on"]["slurm_job_id"] == final[d["key"]]["job_id"] for d in stored)


@needs_slurm
def test_rerun_after_killed_driver_resubmits_only_unfinished_jobs(interrupted_sweep):
    s = interrupted_sweep
    first, final, outcome = s["first"], s["final"], s["outcome"]
    assert len(first) == 8 and s["pending"] and s["running"], "killed with jobs running and queued"
    resubmitted = {k for k, rec in final.items() if len(rec["history"]) > 1}
    failing = {r.key for r in outcome.results if r.label in ("raises", "killed")}  # a rerun retries failures
    assert s["pending"] <= resubmitted <= s["pending"] | failing  # the jobs lost with the driver
    for k in resubmitted:
        assert final[k]["history"] == [first[k]["job_id"], final[k]["job_id"]]
    assert not resubmitted & s["recorded_at_kill"]
    assert not resubmitted & (s["running"] - failing)  # still running at the kill: found again
    assert not set(outcome.executed) & s["recorded_at_kill"]  # recorded results were reused, not rerun
    assert {r.key for r in outcome.results} == set(final)
    print(f"interrupted SLURM sweep: {s['seconds']:.1f}s; {len(s['recorded_at_kill'])} recorded before the kill, "
          f"{len(s['running'])} running (found again), {len(s['pending'])} queued (cancelled, resubmitted)")


@needs_slurm
def test_status_and_collect_commands(interrupted_sweep, tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(interrupted_sweep["dict"]))
    r = CliRunner().invoke(main, ["status", str(f)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "6 done" in r.output and "2 failed" in r.output and "6 collected" in r.output
    before = json.loads((Path(interrupted_sweep["dict"]["output_dir"]) / "slurm" / "submitted.json").read_text())
    r = CliRunner().invoke(main, ["collect", "-q", str(f)], env={"COLUMNS": "250"})
    assert r.exit_code == 1  # the two failed jobs are still failed: collect never resubmits
    assert "2 of 8 jobs failed" in r.output and "deliberate failure" in r.output and "SIGKILL" in r.output
    after = json.loads((Path(interrupted_sweep["dict"]["output_dir"]) / "slurm" / "submitted.json").read_text())
    assert after == before


@needs_slurm
def test_a_task_cancelled_inside_its_arrays_queue_is_lost_then_resubmitted(cluster, varied_checkpoints, tmp_path,
                                                                           monkeypatch):
    """SLURM keeps no record of an array task cancelled before it was split off its array's
    pending record: `status` calls it lost once past the grace period, and a rerun resubmits it
    (and only it)."""
    import harness.executors.slurm as slurm_executor

    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-lost", kind="slurm", mem_gb=1, timeout_min=5,
               setup=SETUP, poll_s=1, array_parallelism=1)
    cfg = validate_config(d)
    log = cfg.resolved_output_dir() / "slurm" / "submitted.json"
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    run_sweep(cfg, quiet=True, mode="detach")
    jobs = json.loads(log.read_text())["jobs"]
    base = next(iter(jobs.values()))["job_id"].split("_")[0]
    try:
        assert len(jobs) >= 5
        victim_id = f"{base}_3"  # one task at a time runs: task 3 waits inside the array's record
        (victim,) = [k for k, rec in jobs.items() if rec["job_id"] == victim_id]
        assert _squeue(base).get(victim_id) == "PENDING"
        subprocess.run(["scancel", victim_id], check=True)
        _wait_for(lambda: slurm_states([victim_id])[victim_id] == "UNKNOWN", 30, "the cancelled task to vanish")
        r = CliRunner().invoke(main, ["status", str(f)], env={"COLUMNS": "250"})
        assert r.exit_code == 0 and "0 lost" in r.output, r.output  # just submitted: accounting may lag
        monkeypatch.setattr(slurm_executor, "UNKNOWN_GRACE_S", 0.0)
        r = CliRunner().invoke(main, ["status", str(f)], env={"COLUMNS": "250"})
        assert "0 failed, 1 lost" in r.output, r.output
        run_sweep(cfg, quiet=True, mode="detach")
        again = json.loads(log.read_text())["jobs"]
        assert [k for k, rec in again.items() if len(rec["history"]) > 1] == [victim]
    finally:
        ids = {rec["job_id"].split("_")[0] for rec in json.loads(log.read_text())["jobs"].values()}
        subprocess.run(["scancel", *sorted(ids)], check=False)


@needs_slurm
def test_a_refused_submission_is_one_clear_error(cluster, varied_checkpoints, tmp_path):
    from harness.errors import HarnessError

    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-refused", kind="slurm", partition="no-such-partition")
    with pytest.raises(HarnessError, match="SLURM refused the jobs: .*invalid partition.*no-such-partition"):
        run_sweep(validate_config(d), quiet=True)


@needs_slurm
def test_a_rerun_says_it_found_its_submitted_jobs_again(cluster, varied_checkpoints, tmp_path):
    """After --detach (or a killed driver) the rerun's header still counts the jobs as to run: the
    next line says none was submitted again and names the array they run in."""
    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-found", kind="slurm", mem_gb=1, poll_s=1)
    d["references"] = False
    d["methods"] = [{"name": "weight_averaging"}, {"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "--detach"])
    assert r.exit_code == 0 and "submitted 2 jobs (SLURM " in r.output, r.output
    array = json.loads((Path(d["output_dir"]) / "slurm" / "submitted.json").read_text())["jobs"]
    (base,) = {rec["job_id"].split("_")[0] for rec in array.values()}
    r = CliRunner().invoke(main, ["sweep", str(f)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert f"submitted no jobs, 2 already queued, running or finished (SLURM {base})" in r.output, r.output


@needs_slurm
def test_detach_names_an_output_folder_with_brackets_as_it_is_named(cluster, varied_checkpoints, tmp_path):
    """``exp[lr]`` is a folder name, not rich markup to drop from the record's path."""
    d = _sweep(varied_checkpoints, tmp_path / "exp[lr]", "toy-brackets", kind="slurm", mem_gb=1, poll_s=1)
    d["references"] = False
    d["methods"] = [{"name": "weight_averaging"}]
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "--detach"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert "[lr]" in d["output_dir"]
    assert f"record: {Path(d['output_dir']) / 'slurm' / 'submitted.json'}\n" in r.output, r.output
    r = CliRunner().invoke(main, ["collect", str(f)])
    assert r.exit_code == 0, r.output


@needs_slurm
def test_a_job_whose_setup_line_fails_is_reported_naming_the_line(cluster, varied_checkpoints, tmp_path):
    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-setup", kind="slurm", mem_gb=1, poll_s=1,
               setup=["export HARNESS_SETUP_TEST=1", "module-not-here load cuda"])
    d["references"] = False
    d["methods"] = [{"name": "weight_averaging"}]
    outcome = run_sweep(validate_config(d), quiet=True)
    (failed,) = outcome.failed
    job_id = json.loads((Path(d["output_dir"]) / "slurm" / "submitted.json").read_text())["jobs"][failed.key]["job_id"]
    log = Path(d["output_dir"]) / "slurm" / f"{job_id}_0_log.err"
    assert failed.error == (f"SLURM job {job_id} FAILED: executor.setup.1 failed (exit 127): module-not-here load "
                            f"cuda; log {log}")


@needs_slurm
def test_a_clean_job_environment_is_the_one_the_setup_lines_make(cluster, varied_checkpoints, tmp_path):
    """Under `sbatch --export=NONE` srun inherits SLURM_EXPORT_ENV=NONE and would start the job
    with no environment at all (no PATH, no submitit variable, nothing a setup line exported):
    the job died in submitit before it could run. It runs with the setup lines' environment."""
    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-export-none", kind="slurm", mem_gb=1, poll_s=1,
               setup=SETUP, sbatch={"export": "NONE"})
    d["references"] = False
    d["methods"] = [{"name": "weight_averaging"}]
    outcome = run_sweep(validate_config(d), quiet=True)
    assert [r.error for r in outcome.failed] == []
    assert [(r.status, r.ran_on["slurm_job_id"] is not None) for r in outcome.results] == [("ok", True)]


def _steps_log(out: Path) -> list[tuple[int, str, int]]:
    logs = list((out / "work").glob("*/steps.log"))
    if not logs:
        return []
    return [(int(a), b, int(c)) for a, b, c in (ln.split() for ln in logs[0].read_text().splitlines())]


@needs_slurm
def test_requeued_adaptation_resumes_from_its_checkpoint(cluster, varied_checkpoints, tmp_path):
    """A WeMoE adaptation submitted with --detach is sent USR2 mid-way (what SLURM sends before the
    time limit): submitit checkpoints and requeues it, the new process resumes from the last
    checkpoint in its workdir, and `collect` records the same result as an uninterrupted run."""
    wemoe = {"steps": 12, "checkpoint_every": 2, "batch_size": 4, "lr": 0.01, "routing_stats_batches": 1}
    method = {"name": "tests.slurm_methods:RecordedWeMoE", "label": "wemoe"}
    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-requeue", kind="slurm", mem_gb=1, timeout_min=5,
               setup=SETUP, poll_s=1)
    d["references"] = False
    d["methods"] = [{**method, "params": {**wemoe, "step_delay": 0.3}}]
    cfg = validate_config(d)
    out = cfg.resolved_output_dir()
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["sweep", str(f), "--detach"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "submitted 1 job " in r.output, r.output
    record = json.loads((out / "slurm" / "submitted.json").read_text())["jobs"]
    (job_id,) = [rec["job_id"] for rec in record.values()]
    run_sweep(cfg, quiet=True, mode="detach")  # queued or running already: not submitted again
    again = json.loads((out / "slurm" / "submitted.json").read_text())["jobs"]
    assert [rec["history"] for rec in again.values()] == [[job_id]]

    _wait_for(lambda: any(kind == "step" and n >= 3 for _, kind, n in _steps_log(out)), 240,
              "three adaptation steps (a checkpoint at step 2)")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    ref_cfg = copy.deepcopy(d)  # the uninterrupted run, here, while SLURM requeues the job
    ref_cfg.update(name="toy-requeue-ref", output_dir=str(tmp_path / "ref"), executor={"kind": "local"})
    ref_cfg["methods"] = [{**method, "params": {**wemoe, "step_delay": 0.0}}]
    (ref,) = run_sweep(validate_config(ref_cfg), quiet=True).results
    outcome = run_sweep(cfg, quiet=True, mode="collect")
    seconds = time.monotonic() - t0

    (result,) = outcome.results
    assert result.status == "ok", result.error
    log = _steps_log(out)
    pids = list(dict.fromkeys(pid for pid, _, _ in log))
    assert len(pids) == 2, f"expected one requeue, got processes {pids}"
    first = [n for pid, kind, n in log if pid == pids[0] and kind == "step"]
    (resume,) = [n for pid, kind, n in log if pid == pids[1] and kind == "start"]
    second = [n for pid, kind, n in log if pid == pids[1] and kind == "step"]
    assert first == list(range(1, len(first) + 1)) and len(first) >= 3
    assert resume >= 2 and resume % 2 == 0 and resume <= first[-1]  # the last checkpoint written
    assert second == list(range(resume + 1, wemoe["steps"] + 1))  # no step before it is redone
    assert json.loads((out / "slurm" / "submitted.json").read_text())["jobs"][result.key]["history"] == [job_id]

    assert ref.status == "ok"
    assert result.metrics == pytest.approx(ref.metrics, rel=1e-6)
    loss, ref_loss = result.artifacts["curves"]["tta/loss"], ref.artifacts["curves"]["tta/loss"]
    assert len(loss) == wemoe["steps"] and loss == pytest.approx(ref_loss, rel=1e-6)
    print(f"requeue: resumed at step {resume} of {wemoe['steps']}, detach->collect {seconds:.1f}s")


# ---------------------------------------------------------------------------------------
# submitit's in-process debug executor (no cluster needed)


def test_debug_executor_matches_local(varied_checkpoints, tmp_path, local_outcome):
    d = _sweep(varied_checkpoints, tmp_path / "sweep", "toy-debug", kind="debug")
    d["methods"].append(FAILING[0])
    outcome = run_sweep(validate_config(d), quiet=True)
    by_key = {r.key: r for r in outcome.results}
    for ref in local_outcome.results:
        assert by_key[ref.key].status == "ok"
        assert by_key[ref.key].metrics == ref.metrics, ref.title
    (failed,) = outcome.failed
    assert failed.label == "raises" and "deliberate failure" in failed.error
    assert len(outcome.results) == len(local_outcome.results) + 1
    assert not (Path(d["output_dir"]) / "slurm" / "submitted.json").exists()  # nothing to find again
    with pytest.raises(Exception, match="needs executor.kind slurm"):
        run_sweep(validate_config(d), quiet=True, mode="detach")


def test_only_commands_that_submit_check_the_cluster(tmp_path, monkeypatch):
    """status, collect, report and ui read jobs already submitted: a partition whose limits
    changed since (or a sweep file copied off the cluster) must not lock them out."""
    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: PARTITIONS)
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["model"] = {"source": "embedded"}
    d["tasks"] = ["emb_mnist"]
    d["executor"] = {"kind": "slurm", "timeout_min": 121}  # over the default partition's 120 min
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    over = "executor.timeout_min: over the time limit of partition cpu"
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2 and over in r.output
    r = CliRunner().invoke(main, ["report", str(f)])
    assert r.exit_code == 2 and over not in r.output and "does not exist (the sweep has not run there)" in r.output


# sbatch's own words (SLURM 22.05) for options it refuses at submission
REFUSED_ACCOUNT = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
REFUSED_QOS = "sbatch: error: Batch job submission failed: Invalid qos specification"
REFUSED_GRES = "sbatch: error: Invalid generic resource (gres) specification"
REFUSED_MEMORY = "sbatch: error: Memory specification can not be satisfied"
REFUSED_TIME = "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)"
REFUSED_NODE = "sbatch: error: Batch job submission failed: Invalid node name specified"


def _refusing_sbatch(monkeypatch, message: str) -> None:
    """sbatch refuses every submission with ``message``, as submitit reports it."""
    import submitit

    import harness.executors.slurm as slurm

    class Refusing:
        def map_array(self, fn, args):
            raise submitit.core.utils.FailedJobError(message)

    monkeypatch.setattr(slurm.SlurmExecutor, "_submitit", lambda self: Refusing())
    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: None)


@pytest.mark.parametrize("executor, overrides, message, expected", [
    ({"account": "nosuch"}, [], REFUSED_ACCOUNT,
     f"s.yaml: executor.account: SLURM refused the jobs: {REFUSED_ACCOUNT} (got 'nosuch')"),
    ({}, [], REFUSED_ACCOUNT,
     f"s.yaml: executor.account: SLURM refused the jobs: {REFUSED_ACCOUNT} (not given: the cluster's default)"),
    ({"qos": "high"}, [], REFUSED_QOS, f"s.yaml: executor.qos: SLURM refused the jobs: {REFUSED_QOS} (got 'high')"),
    ({"gpus_per_node": 2}, [], REFUSED_GRES,
     f"s.yaml: executor.gpus_per_node: SLURM refused the jobs: {REFUSED_GRES} (got 2)"),
    ({"gpus_per_node": 2, "sbatch": {"gres": "gpu:a100:2"}}, [], REFUSED_GRES,
     f"s.yaml: executor.sbatch.gres: SLURM refused the jobs: {REFUSED_GRES} (got 'gpu:a100:2')"),
    ({}, ["executor.qos=high"], REFUSED_QOS,
     f"<command line> (executor.qos=high, over {{file}}): executor.qos: SLURM refused the jobs: {REFUSED_QOS} "
     "(got 'high')"),
    ({"mem_gb": 4}, [], REFUSED_MEMORY, f"s.yaml: executor.mem_gb: SLURM refused the jobs: {REFUSED_MEMORY} (got 4.0)"),
    ({"sbatch": {"mem-per-cpu": "64G"}}, [], REFUSED_MEMORY,
     f"s.yaml: executor.sbatch.mem-per-cpu: SLURM refused the jobs: {REFUSED_MEMORY} (got '64G')"),
    ({"sbatch": {"time-min": 30}}, [], REFUSED_TIME,
     f"s.yaml: executor.sbatch.time-min: SLURM refused the jobs: {REFUSED_TIME} (got 30)"),
    ({"timeout_min": 30}, [], REFUSED_TIME, f"s.yaml: executor.timeout_min: SLURM refused the jobs: {REFUSED_TIME} "
     "(got 30)"),
    ({"sbatch": {"gpus-per-task": 1}}, [], REFUSED_GRES,
     f"s.yaml: executor.sbatch.gpus-per-task: SLURM refused the jobs: {REFUSED_GRES} (got 1)"),
    ({"mem_gb": 1, "sbatch": {"cpus-per-gpu": 2}}, ["executor.mem_gb=2"], REFUSED_GRES,
     f"s.yaml: executor.sbatch.cpus-per-gpu: SLURM refused the jobs: {REFUSED_GRES} (got 2)"),
    ({"sbatch": {"mail-type": "BADVAL", "mail": "x"}}, [], "sbatch: error: Invalid --mail-type specification",
     "s.yaml: executor.sbatch.mail-type: SLURM refused the jobs: sbatch: error: Invalid --mail-type specification "
     "(got 'BADVAL')"),
    ({"sbatch": {"mem-per-cpu": "2G", "nosuch-option": 1}}, [],
     "sbatch: unrecognized option '--nosuch-option=1'\nTry \"sbatch --help\" for more information",
     "s.yaml: executor.sbatch.nosuch-option: SLURM refused the jobs: sbatch: unrecognized option "
     "'--nosuch-option=1' Try \"sbatch --help\" for more information (got 1)"),
    ({"sbatch": {"exclude": "node[3-4]"}}, [], REFUSED_NODE,
     f"s.yaml: executor.sbatch.exclude: SLURM refused the jobs: {REFUSED_NODE} (got 'node[3-4]')"),
    ({"sbatch": {"mail-type": "END", "nodelist": "gpu9"}}, [], REFUSED_NODE,
     f"s.yaml: executor.sbatch.nodelist: SLURM refused the jobs: {REFUSED_NODE} (got 'gpu9')"),
    ({"sbatch": {"mail-type": "END"}}, [], REFUSED_NODE, f"s.yaml: executor: SLURM refused the jobs: {REFUSED_NODE}"),
    ({"mem_gb": 4}, [], "sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "s.yaml: executor: SLURM refused the jobs: sbatch: error: Batch job submission failed: Requested node "
     "configuration is not available"),
])
def test_an_option_sbatch_refuses_is_named_with_its_field(micro_checkpoints, tmp_path, monkeypatch, executor,
                                                         overrides, message, expected):
    _refusing_sbatch(monkeypatch, message)
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", **executor}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f), *overrides])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, err
    assert err == "error: " + expected.replace("s.yaml", str(f)).format(file=f), err


def test_an_unreachable_controller_blames_no_field(micro_checkpoints, tmp_path, monkeypatch):
    """sbatch failing because the controller does not answer is no option's fault: one line that
    says so and what to do, not an ``executor`` field to fix."""
    down = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"
    _refusing_sbatch(monkeypatch, down)
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", "account": "mine"}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, err
    assert err == (f"error: SLURM did not take the jobs: {down}; its controller did not answer, so this array was "
                   "not submitted: rerun once `sinfo` answers (jobs already submitted are found again, not "
                   "submitted twice)")


def test_a_refused_node_name_blames_the_sbatch_option_naming_nodes():
    """No typed field names nodes: ``exclude``, ``nodelist`` or ``nodefile`` under ``sbatch:`` is
    blamed, else the whole ``executor`` block (never a typed field sbatch did not complain of)."""
    from harness.config import ExecutorSpec
    from harness.executors.slurm_reasons import refused_field

    def blamed(**fields):
        return refused_field(ExecutorSpec(kind="slurm", **fields), REFUSED_NODE)

    assert blamed(sbatch={"exclude": "node[3-4]"}) == ("executor.sbatch.exclude", "node[3-4]")
    assert blamed(sbatch={"mail-type": "END", "nodelist": "gpu9"}) == ("executor.sbatch.nodelist", "gpu9")
    assert blamed(sbatch={"nodefile": "/tmp/nodes"}) == ("executor.sbatch.nodefile", "/tmp/nodes")
    assert blamed(partition="gpu", gpus_per_node=1, sbatch={"mail-type": "END"}) == ("executor", None)


@pytest.mark.parametrize("sbatch, refusal, blamed", [
    ({"mail-type": "END", "exclud": "nosuchnode"}, REFUSED_NODE, "exclud"),
    ({"nodel": "gpu9"}, REFUSED_NODE, "nodel"),
    ({"nodefi": "/tmp/nodes"}, REFUSED_NODE, "nodefi"),
    ({"mem-per-c": "4G"}, REFUSED_MEMORY, "mem-per-c"),
])
def test_a_refused_option_written_as_the_start_of_its_name_is_blamed(sbatch, refusal, blamed):
    """sbatch reads the start of an option's name as the option (``--exclud`` is ``--exclude``),
    so the key written that way is the one to fix, not the whole ``executor`` block."""
    from harness.config import ExecutorSpec
    from harness.executors.slurm_reasons import refused_field

    e = ExecutorSpec(kind="slurm", mem_gb=4, sbatch=sbatch)
    assert refused_field(e, refusal) == (f"executor.sbatch.{blamed}", sbatch[blamed])


@pytest.mark.parametrize("sbatch, words, blamed", [
    ({"mail-type": "END", "time-min": "2:00:00"}, "Invalid time-min specification (exceeds job's time or other "
     "limits)", "time-min"),
    ({"dependency": "afterok:99999"}, "Job dependency problem", "dependency"),
    ({"reservation": "maint"}, "Requested reservation is invalid", "reservation"),
    ({"licenses": "matlab"}, "Invalid license specification", "licenses"),
    ({"batch": "haswell"}, "Requested node configuration is not available", None),
])
def test_the_controllers_words_naming_an_option_without_its_dashes_blame_it(sbatch, words, blamed):
    """The controller names an option in words, not as ``--option``: that option is the one to
    fix, not the whole ``executor`` block; "Batch job" is no word of an option ``batch``."""
    from harness.config import ExecutorSpec
    from harness.executors.slurm_reasons import refused_field

    reason = f"sbatch: error: Batch job submission failed: {words}"
    expected = (f"executor.sbatch.{blamed}", sbatch[blamed]) if blamed else ("executor", None)
    assert refused_field(ExecutorSpec(kind="slurm", sbatch=sbatch), reason) == expected


@needs_slurm
@pytest.mark.parametrize("executor, expected", [
    ({"constraint": "nosuch"}, "executor.constraint: SLURM refused the jobs: sbatch: error: Batch job submission "
                               "failed: Invalid feature specification (got 'nosuch')"),
    ({"gpus_per_node": 1}, "executor.gpus_per_node: SLURM refused the jobs: sbatch: error: Invalid generic "
                           "resource (gres) specification (got 1)"),
    ({"sbatch": {"mail-type": "BADVAL"}}, "executor.sbatch.mail-type: SLURM refused the jobs: sbatch: error: "
                                          "Invalid --mail-type specification (got 'BADVAL')"),
    ({"sbatch": {"nosuch-option": 1}}, "executor.sbatch.nosuch-option: SLURM refused the jobs: sbatch: "
                                       "unrecognized option '--nosuch-option=1' Try \"sbatch --help\" for more "
                                       "information (got 1)"),
    ({"timeout_min": 5, "sbatch": {"time-min": "2:00:00"}},
     "executor.sbatch.time-min: SLURM refused the jobs: sbatch: error: Batch job submission failed: Invalid "
     "time-min specification (exceeds job's time or other limits) (got '2:00:00')"),
])
def test_the_cluster_refusing_an_option_names_its_field(cluster, micro_checkpoints, tmp_path, executor, expected):
    """The single-node cluster has no node features and no GPUs: sbatch refuses both."""
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm", **executor}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and err == f"error: {f}: {expected}", err
    assert not (tmp_path / "out" / "slurm" / "submitted.json").exists()


def test_collect_with_nothing_submitted_is_an_error(micro_checkpoints, tmp_path, monkeypatch):
    """``collect`` on a folder nothing was submitted from (a mistyped output_dir, a sweep never
    run with kind slurm) says so and exits 2, not 0 with an empty table."""
    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: PARTITIONS)
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "slurm"}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(d))
    for quiet in ([], ["-q"]):
        r = CliRunner().invoke(main, ["collect", *quiet, str(f)])
        assert r.exit_code == 2, r.output
        assert f"no SLURM submissions recorded under {Path(d['output_dir']) / 'slurm'}" in r.stderr, r.stderr


def test_status_does_not_call_collected_a_job_a_rerun_submits_again(tmp_path, micro_checkpoints, monkeypatch):
    """A job whose in-job robustness study failed was recorded by the driver (results/<key>.json,
    with study_error), yet a rerun submits it again: ``harness status`` showed it failed and
    collected both, as if nothing were left to do. Truth: what a rerun does with it (_reattach)."""
    from harness.executors.slurm import SlurmExecutor, status_table
    from harness.job import JobResult
    from harness.plan import JobSpec
    from tests.test_untrusted_files import _submitted_result

    spec = JobSpec("merge", "x", method="task_arithmetic", key="k")
    result = JobResult.of(spec, "ok", metrics={"acc/avg": 50.0},
                          study_error="StudyFailed: robustness study, contrast (severity 3): OSError: unreadable")
    cfg, _ = _submitted_result(tmp_path, micro_checkpoints, monkeypatch, result.to_dict())
    results = cfg.resolved_output_dir() / "results"
    results.mkdir()
    (results / "k.json").write_text(json.dumps(result.to_dict()))
    _, submit, _ = SlurmExecutor(cfg)._reattach([spec])
    assert submit == [spec]
    _, counts = status_table(cfg)
    assert (counts["failed"], counts["collected"]) == (1, 0), counts


def test_jobs_ending_without_results_cost_two_sacct_calls_a_pass_not_two_each(tmp_path, monkeypatch):
    """A sweep whose every job fails at once (a setup line that fails) asked sacct twice per job,
    each time about the whole array: 1000 calls in one burst for 500 jobs. The jobs a pass finds
    ended are asked about together."""
    sacct = {}
    for n in (6, 48):
        got, polls, _ = _sweep_of_fake_jobs(tmp_path / str(n), monkeypatch, n, per_poll=n, no_result=frozenset(range(n)))
        assert sorted(got) == sorted((f"k{i}", "failed") for i in range(n))
        sacct[n] = sum(p["sacct"] for p in polls)
    assert sacct[48] == sacct[6]


def test_a_slurm_folder_that_cannot_be_listed_does_not_resubmit_finished_jobs(tmp_path, monkeypatch):
    """A rerun looked for results in one listing of the SLURM folder; a listing refused (no read
    permission on a shared folder, a stale NFS handle) read as no result at all, so a job that
    finished with its result was submitted again. Each result file is looked at instead."""
    import pickle

    import submitit

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    spec = JobSpec("merge", "ta", key="k0")
    ex.log.record({"k0": {"job_id": "100_0", "title": spec.title, "settings": slurm.job_settings(ex.cfg)}})
    job = submitit.SlurmJob(folder=ex.folder, job_id="100_0")
    job.paths.result_pickle.parent.mkdir(parents=True, exist_ok=True)
    job.paths.result_pickle.write_bytes(pickle.dumps(("success", {"status": "ok", "metrics": {}})))
    monkeypatch.setattr("harness.executors.slurm_cluster._run",
                        lambda cmd: "100_0|COMPLETED\n" if cmd[0] == "sacct" else "")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == job.paths.result_pickle.parent:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    attach, submit, _ = ex._reattach([spec])
    assert submit == [] and [t.spec.key for t in attach] == ["k0"]


def _polled(tmp_path, monkeypatch, state: str):
    """(the executor, job 9_2 in ``state``, the clock its polls read (seconds, settable)):
    accounting says the job ended as ``state`` with exit code 0; its result, once the test
    writes ``result_pickle``, is an ok merge."""
    from types import SimpleNamespace

    import harness.executors.slurm as slurm
    from harness.job import JobResult
    from harness.plan import JobSpec

    clock = [1000.0]
    monkeypatch.setattr(slurm, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=time.sleep))
    monkeypatch.setattr(slurm, "sacct_details", lambda ids: {i: {"State": state, "ExitCode": "0:0"} for i in ids})
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    spec = JobSpec("merge", "ta", key="k")
    job = _fake_job(tmp_path, "9_2")
    job.result = lambda: JobResult.of(spec, "ok", metrics={"acc/avg": 50.0}).to_dict()
    t = slurm._Tracked(spec, job, state=state)
    ex._ended, ex._details = [t], {}
    return ex, t, clock


def slurm_listed(t) -> set[str]:
    """The folder listing a poll makes of ``t``'s files, as the driver makes it."""
    from harness.executors.slurm_cluster import listed_files

    return listed_files(t.paths())


def test_a_job_slurm_no_longer_knows_is_lost_only_after_the_grace_period(tmp_path, monkeypatch):
    """README: a job squeue and sacct both answer nothing about counts as lost, and the running
    driver reports it failed, after 60 s (accounting lags behind submission), not at the first poll."""
    ex, t, clock = _polled(tmp_path, monkeypatch, "UNKNOWN")
    assert ex._poll(t, set()) is None
    clock[0] += 59
    assert ex._poll(t, set()) is None
    clock[0] += 2
    result = ex._poll(t, set())
    assert result.status == "failed" and "is unknown to sacct and squeue" in result.error


def test_a_result_file_landing_after_slurm_says_completed_is_the_jobs_result(tmp_path, monkeypatch):
    """SLURM may call a job COMPLETED before its result file shows on a shared filesystem: the
    driver waits for it (a grace period) rather than failing a job that succeeded; and a result
    that came after the poll listed the folder is read, not a failure."""
    ex, t, clock = _polled(tmp_path, monkeypatch, "COMPLETED")
    assert ex._poll(t, set()) is None  # just ended, no result yet: not failed
    clock[0] += 5
    t.job.paths.result_pickle.write_bytes(b"the job's result")
    result = ex._poll(t, slurm_listed(t))
    assert result.status == "ok" and result.metrics == {"acc/avg": 50.0}

    ex, t, clock = _polled(tmp_path / "late", monkeypatch, "COMPLETED")
    (tmp_path / "late").mkdir()
    assert ex._poll(t, set()) is None
    clock[0] += 3600  # past any grace; the listing this poll got was made before the file landed
    t.job.paths.result_pickle.write_bytes(b"the job's result")
    result = ex._poll(t, set())
    assert result.status == "ok" and result.metrics == {"acc/avg": 50.0}


@pytest.mark.parametrize("timeout_min, delay", [(1, 15), (2, 30), (6, 90), (600, 90)])
def test_the_time_limit_warning_comes_as_long_before_the_limit_as_the_readme_says(tmp_path, timeout_min, delay):
    """README: SLURM sends USR2 ``min(90 s, timeout_min x 15 s)`` before the limit."""
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "timeout_min": timeout_min}
    assert submitit_parameters(validate_config(d))["slurm_signal_delay_s"] == delay == min(90, timeout_min * 15)


def test_the_submission_record_keeps_each_jobs_history_and_only_its_latest_fields(tmp_path):
    """README: submitted.json maps each job key to its SLURM id with the history of its
    resubmissions; a resubmission's entry replaces the old one, whose fields (the code it was
    planned with) no longer describe the job that runs."""
    from harness.executors.slurm import SubmissionLog

    log = SubmissionLog(tmp_path)
    log.record({"k": {"job_id": "5_0", "harness_code": "0ld0ld0ld0ld0ld0"}, "j": {"job_id": "5_1"}})
    log.record({"k": {"job_id": "6_0"}})
    log.record({"k": {"job_id": "7_3", "title": "ta"}})
    assert log.load() == {"k": {"job_id": "7_3", "title": "ta", "history": ["5_0", "6_0", "7_3"]},
                          "j": {"job_id": "5_1", "history": ["5_1"]}}


def test_accounting_records_of_array_ranges_and_single_tasks_give_each_tasks_state(monkeypatch):
    """sacct lists array tasks that never started as one range record ('100_[2-4%8]': tasks 2, 3
    and 4, at most 8 at a time), and a task that started since on its own line, which wins; a
    state may carry words after it ('CANCELLED by 1000')."""
    answers = {"squeue": "", "scontrol": "Slurmctld(primary) at vm is UP\n",
               "sacct": "100_[2-4%8]|PENDING\n100_0|COMPLETED\n100_1|CANCELLED by 1000\n100_3|RUNNING\n"
                        "101_[0,2-3]|PENDING\n"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers[cmd[0]])
    ids = [f"100_{i}" for i in range(6)] + [f"101_{i}" for i in range(5)]
    assert slurm_states(ids) == {
        "100_0": "COMPLETED", "100_1": "CANCELLED", "100_2": "PENDING", "100_3": "RUNNING", "100_4": "PENDING",
        "100_5": "UNKNOWN", "101_0": "PENDING", "101_1": "UNKNOWN", "101_2": "PENDING", "101_3": "PENDING",
        "101_4": "UNKNOWN"}


def test_the_controllers_state_of_a_task_wins_over_accountings(monkeypatch):
    """sacct, asked about an array once one of its tasks left the queue, answers for every task of
    it: its record of a task the controller still holds (a range it saw pending) is older than
    what squeue says of that task now."""
    answers = {"squeue": "7_0|RUNNING|None\n", "scontrol": "Slurmctld(primary) at vm is UP\n",
               "sacct": "7_[0-1]|PENDING\n7_1|FAILED\n"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers[cmd[0]])
    assert slurm_states(["7_0", "7_1"]) == {"7_0": "RUNNING", "7_1": "FAILED"}


def test_accounting_details_give_each_asked_jobs_state_exit_code_and_its_batch_steps_signal(monkeypatch):
    """What a failed job's reason quotes: its state and exit code from its own record, and the
    signal that killed its batch step (the job's process), not the job record's or the extern
    step's; tasks of the array that were not asked about get no details."""
    import harness.executors.slurm as slurm

    def run(cmd: list[str]) -> str:
        if "-X" in cmd:
            return "12_0|CANCELLED by 1000|0:15\n12_1|FAILED|1:0\n12_[2-3]|PENDING|0:0\n"
        return "12_0|0:15\n12_0.batch|0:9\n12_0.extern|0:15\n12_1|1:0\n12_1.batch|1:0\n12_1.extern|0:0\n"

    monkeypatch.setattr("harness.executors.slurm_cluster._run", run)
    assert slurm.sacct_details(["12_1", "12_0"]) == {
        "12_0": {"State": "CANCELLED", "ExitCode": "0:15", "Signal": "9"},
        "12_1": {"State": "FAILED", "ExitCode": "1:0"}}


def _recorded_executor(tmp_path, jobs: dict[str, str], submitted_at: dict[str, str] | None = None):
    """A slurm executor whose record holds job ``jobs[key]`` for each key, none with a result."""
    import harness.executors.slurm as slurm

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm"}
    ex = slurm.SlurmExecutor(validate_config(d))
    ex.log.record({k: {"job_id": j, "title": k, "submitted_at": (submitted_at or {}).get(k, slurm._now()),
                       "settings": slurm.job_settings(ex.cfg)} for k, j in jobs.items()})
    return ex


def test_a_rerun_finds_queued_and_running_jobs_and_resubmits_ended_lost_and_new_ones(tmp_path, monkeypatch):
    """Without results: a job SLURM still holds is waited on, one that ended (failed, out of
    memory) or that neither squeue nor sacct knows while the controller answers is submitted
    again, as is one never submitted."""
    from harness.plan import JobSpec

    answers = {"squeue": "20_0|RUNNING|None\n20_1|PENDING|Resources\n", "scontrol": "Slurmctld(primary) at vm is UP\n",
               "sacct": "20_2|FAILED\n20_3|OUT_OF_MEMORY\n"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers[cmd[0]])
    ex = _recorded_executor(tmp_path, {f"k{i}": f"20_{i}" for i in range(5)})
    specs = [JobSpec("merge", f"k{i}", key=f"k{i}") for i in range(6)]
    attach, submit, _ = ex._reattach(specs)
    assert [t.spec.key for t in attach] == ["k0", "k1"]
    assert [s.key for s in submit] == ["k2", "k3", "k4", "k5"]


def test_status_calls_a_job_lost_only_past_the_grace_and_an_ended_one_without_result_failed(tmp_path, monkeypatch):
    """``harness status``: a job SLURM does not know is lost once submitted longer ago than
    UNKNOWN_GRACE_S (accounting lags behind submission), pending before; one that COMPLETED
    without a result failed (a rerun submits it again)."""
    import harness.executors.slurm as slurm

    answers = {"squeue": "30_0|RUNNING|None\n", "scontrol": "Slurmctld(primary) at vm is UP\n",
               "sacct": "30_1|COMPLETED\n"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers[cmd[0]])
    long_ago = "2020-01-01T00:00:00+00:00"
    ex = _recorded_executor(tmp_path, {f"k{i}": f"30_{i}" for i in range(5)}, {"k3": long_ago, "k4": long_ago})
    _, counts = slurm.status_table(ex.cfg)
    assert counts == {"running": 1, "requeued": 0, "failed": 1, "lost": 2, "pending": 1, "done": 0, "collected": 0}


def test_status_says_why_a_job_that_ended_without_a_result_failed(tmp_path, monkeypatch):
    """``harness status`` showed ``failed`` alone for a job cancelled, timed out or killed for its
    memory; the reason was told only by the driver and ``collect``. It now shows the one they give."""
    import io

    from rich.console import Console

    import harness.executors.slurm as slurm

    answers = {"squeue": "", "scontrol": "Slurmctld(primary) at vm is UP\n",
               "sacct": "40_0|CANCELLED\n40_1|TIMEOUT\n40_2|OUT_OF_MEMORY\n40_3|COMPLETED\n"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: answers[cmd[0]])
    ex = _recorded_executor(tmp_path, {f"k{i}": f"40_{i}" for i in range(4)}, {})
    table, counts = slurm.status_table(ex.cfg)
    assert counts["failed"] == 4
    text = io.StringIO()
    Console(file=text, width=300).print(table)
    states = {line.split("│")[2].strip(): line.split("│")[3].strip() for line in text.getvalue().splitlines()
              if line.count("│") >= 5 and "40_" in line}
    assert states == {"40_0": "failed (cancelled)", "40_1": "failed (time limit reached)",
                      "40_2": "failed (out of memory)", "40_3": "failed (the job ended without writing a result)"}


def test_a_completed_job_gets_longer_for_its_result_file_than_a_failed_one(tmp_path, monkeypatch):
    """A COMPLETED job most likely wrote a result that the shared filesystem has yet to show: the
    driver waits RESULT_GRACE_S (15 s) for it. A job SLURM calls FAILED gets 3 s before it is
    reported, with the reason accounting gives."""
    import harness.executors.slurm as slurm

    ex, t, clock = _polled(tmp_path, monkeypatch, "COMPLETED")
    assert ex._poll(t, set()) is None
    clock[0] += slurm.RESULT_GRACE_S - 1
    assert ex._poll(t, set()) is None
    clock[0] += 2
    result = ex._poll(t, set())
    assert result.status == "failed" and result.error.startswith(
        "SLURM job 9_2 COMPLETED: the job ended without writing a result before it started")

    ex, t, clock = _polled(tmp_path / "f", monkeypatch, "FAILED")
    assert ex._poll(t, set()) is None
    clock[0] += 2
    assert ex._poll(t, set()) is None
    clock[0] += 2
    result = ex._poll(t, set())
    assert result.status == "failed" and result.error.startswith("SLURM job 9_2 FAILED: the job process died")


def test_a_setting_the_earlier_submission_did_not_record_counts_as_changed(tmp_path):
    """A job submitted by a harness that had no such setting ran without it: a value set now is
    not what that job keeps."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "mem_gb": 2}
    ex = slurm.SlurmExecutor(validate_config(d))
    then = {k: v for k, v in slurm.job_settings(ex.cfg).items() if k != "mem_gb"}
    ex.log.record({f"k{i}": {"job_id": f"8_{i}", "settings": then} for i in range(2)})
    tracked = [slurm._Tracked(JobSpec("merge", f"m{i}", key=f"k{i}"), _fake_job(ex.folder, f"8_{i}")) for i in range(2)]
    assert ex.changed_settings(tracked, _listing(tracked)) == (
        "2 queued or running jobs found from an earlier submission keep the executor settings of that submission "
        "(mem_gb None, now 2.0): `scancel 8_0 8_1` and rerun to submit with these")


def test_a_submitit_job_error_is_reported_by_its_last_line_of_substance(tmp_path):
    """submitit's FailedJobError wraps the job's traceback in rules and ends with the log paths:
    the reason is the exception line above them, cut at 500 characters."""
    from harness.executors.slurm_reasons import submitit_reason

    def failed(last: str) -> str:  # submitit's text (submitit/core/core.py, Job.exception)
        return ("Job (task=0) failed during processing with trace:\n----------------------\n"
                f"Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n{last}\n\n"
                "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'"
                f"or at paths:\n  - {tmp_path}/7_0_log.err\n  - {tmp_path}/7_0_log.out")

    assert submitit_reason(failed("RuntimeError: boom")) == "RuntimeError: boom"
    assert submitit_reason(failed("ValueError: " + "x" * 600)) == ("ValueError: " + "x" * 600)[:500]
    assert submitit_reason("----\n\n") == ""


def test_a_memory_sample_equal_to_the_limit_reads_as_equal():
    """Two decimals of GiB unless the sample and the limit would read alike while they differ."""
    from harness.executors.slurm_reasons import _gib_over_limit

    assert _gib_over_limit(2**30, 2**30) == ("1.00", "1.00")
    assert _gib_over_limit(3 * 2**29, 2**30) == ("1.50", "1.00")
    assert _gib_over_limit(2**30 + 2**20, 2**30) == ("1.001", "1.000")  # 1 MiB over: 1.0009765625 GiB


def test_a_refused_generic_resource_blames_gpus_per_node_only_when_gpus_were_asked_for():
    from harness.config import ExecutorSpec
    from harness.executors.slurm_reasons import refused_field

    assert refused_field(ExecutorSpec(kind="slurm"), REFUSED_GRES) == ("executor", None)
    assert refused_field(ExecutorSpec(kind="slurm", gpus_per_node=2), REFUSED_GRES) == ("executor.gpus_per_node", 2)


def test_sinfo_lines_of_a_partition_give_its_largest_node_and_limit(monkeypatch):
    """sinfo prints a line per node configuration of a partition ('+': some nodes have more); the
    default partition's name ends in '*'."""
    from types import SimpleNamespace

    import harness.executors.slurm_cluster as slurm

    out = ("cpu*|2:00:00|16|64000\ncpu*|1:00:00|32+|128000+\ngpu|1-00:00:00|8|256000\nnot sinfo's\n")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/sinfo")
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=0, stdout=out))
    assert slurm.cluster_partitions() == {"cpu": {"limit_min": 120, "cpus": 32, "mem_mb": 128000, "default": True},
                                          "gpu": {"limit_min": 1440, "cpus": 8, "mem_mb": 256000, "default": False}}


def test_the_default_partitions_limits_apply_wherever_sinfo_lists_it(tmp_path):
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "timeout_min": 600}
    parts = {"short": {**PARTITIONS["cpu"], "limit_min": 30, "default": False},
             "long": {**PARTITIONS["cpu"], "limit_min": 1440, "default": True}}
    check_cluster(validate_config(d, "sweep.yaml"), "sweep.yaml", parts)  # long's 1440 min, not short's 30
    d["executor"]["timeout_min"] = 1441
    with pytest.raises(ConfigError, match="over the time limit of partition long .the cluster's default., 1440 min"):
        check_cluster(validate_config(d, "sweep.yaml"), "sweep.yaml", parts)


def test_gpus_and_backslashes_in_typed_fields_reach_sbatch_as_written(tmp_path):
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "gpus_per_node": 4, "account": "dom\\proj"}
    params = submitit_parameters(validate_config(d))
    assert params["gpus_per_node"] == 4 and params["slurm_account"] == "dom\\\\proj"


def test_a_job_slurm_calls_completed_shows_running_until_its_result_comes(tmp_path):
    """Its result file may still be on its way (shared filesystems lag): not failed meanwhile."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    t = slurm._Tracked(JobSpec("merge", "m", key="k"), _fake_job(tmp_path, "9_0"), state="COMPLETED")
    assert slurm.display_state(t) == "running"


def test_a_job_slurm_says_ended_otherwise_shows_failed_before_its_reason_comes(tmp_path):
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    states = ["TIMEOUT", "OUT_OF_MEMORY", "FAILED", "NODE_FAIL"]
    tracked = [slurm._Tracked(JobSpec("merge", s, key=s), _fake_job(tmp_path, f"9_{i}"), state=s)
               for i, s in enumerate(states)]
    assert [slurm.display_state(t) for t in tracked] == ["failed"] * 4


def test_a_table_of_more_jobs_than_it_shows_puts_running_and_failed_ones_first(tmp_path):
    from rich.console import Console

    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    n = slurm._LiveTable.MAX_ROWS + 5
    tracked = [slurm._Tracked(JobSpec("merge", f"m{i}", key=str(i)), _fake_job(tmp_path, f"9_{i}"),
                              outcome="done" if i < n - 2 else None, state="RUNNING" if i == n - 2 else "FAILED")
               for i in range(n)]
    console = Console(width=200, record=True)
    console.print(slurm.job_table(tracked))
    rows = [line.split()[1] for line in console.export_text().splitlines() if line.split()[1:2]
            and line.split()[1].startswith("m")]
    assert rows[:2] == [f"m{n - 2}", f"m{n - 1}"] and len(rows) == slurm._LiveTable.MAX_ROWS


def test_one_job_found_with_other_settings_is_told_in_the_singular(tmp_path):
    """One job found keeps its settings ("1 ... job ... keeps"), as the warning about harness code says "was"."""
    import harness.executors.slurm as slurm
    from harness.plan import JobSpec

    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["executor"] = {"kind": "slurm", "mem_gb": 1}
    before = slurm.job_settings(validate_config(d))
    d["executor"] = {"kind": "slurm", "mem_gb": 2}
    ex = slurm.SlurmExecutor(validate_config(d))
    ex.log.record({"k": {"job_id": "8_0", "settings": before}})
    tracked = [slurm._Tracked(JobSpec("merge", "m", key="k"), _fake_job(ex.folder, "8_0"))]
    assert ex.changed_settings(tracked, _listing(tracked)) == (
        "1 queued or running job found from an earlier submission keeps the executor settings of that submission "
        "(mem_gb 1.0, now 2.0): `scancel 8_0` and rerun to submit with these")

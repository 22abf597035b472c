"""Files and stores others may write (a shared Optuna storage, a sweep folder): what the harness
unpickles from them runs no code of theirs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest


class _OpensFile:
    """A pickle that, when unpickled, creates the file it names (as any code it named would run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cmaes_study(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from harness.config import TuneSpec
    from harness.tuning import make_sampler, quiet_optuna

    quiet_optuna()
    spec = f"journal:{tmp_path / 'shared' / 'journal.log'}"
    tune = TuneSpec(sampler="cmaes", storage=spec, space={"x": {"type": "float", "low": -1, "high": 1},
                                                          "y": {"type": "float", "low": -1, "high": 1}})
    (tmp_path / "shared").mkdir()
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "shared" / "journal.log")))
    return optuna.create_study(study_name="s", storage=storage, sampler=make_sampler(tune, 0)), spec


def test_cmaes_state_from_a_shared_storage_is_not_unpickled_when_it_names_code(tmp_path):
    """Optuna's CMA-ES sampler resumes from an optimizer it unpickles out of a trial's system
    attributes: a trial someone added to a shared ``tune.storage`` ran its code in the driver."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from harness.tuning import UntrustedStudyState

    study, spec = _cmaes_study(tmp_path)
    marker = tmp_path / "pwned"
    dist = FloatDistribution(-1, 1)
    study.add_trial(create_trial(params={"x": 0.1, "y": 0.2}, distributions={"x": dist, "y": dist}, value=1.0,
                                 system_attrs={"cma:optimizer:0": pickle.dumps(_OpensFile(marker)).hex(),
                                               "cma:generation": 0}))
    with pytest.raises(UntrustedStudyState) as err:
        study.ask().suggest_float("x", -1, 1)  # Optuna samples (and resumes CMA-ES) at the first suggest
    assert not marker.exists()
    assert str(err.value) == (f"study storage {spec}: trial 0 holds a CMA-ES state that is not one (UnpicklingError: "
                              "io.open is no part of a CMA-ES optimizer's state); refused to unpickle it, as that "
                              "could run code from the storage")


def test_an_optuna_without_the_cmaes_restore_hook_is_refused_not_trusted(monkeypatch):
    """The state check overrides the method Optuna's CMA-ES sampler unpickles its optimizer in;
    an Optuna without it would never call the check and unpickle the state itself: refused."""
    import optuna

    from harness.errors import HarnessError
    from harness.tuning import cmaes_sampler

    monkeypatch.delattr(optuna.samplers.CmaEsSampler, "_restore_optimizer")
    with pytest.raises(HarnessError, match=r"tune.sampler: cmaes: Optuna .*'s CMA-ES sampler has no _restore_optimizer"):
        cmaes_sampler(0, "journal:x")


def test_cmaes_state_a_study_stored_resumes_as_optuna_would(tmp_path):
    """The optimizer a real generation stored reads back as plain unpickling reads it."""
    from harness.tuning import restore_cma_state

    study, spec = _cmaes_study(tmp_path)
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.3) ** 2 + t.suggest_float("y", -1, 1) ** 2, n_trials=8)
    stored = [t for t in study.trials if any(k.startswith("cma:optimizer") for k in t.system_attrs)]
    assert stored, "no generation completed in 8 trials"
    attrs = stored[-1].system_attrs
    hex_state = "".join(attrs[f"cma:optimizer:{i}"] for i in range(sum(k.startswith("cma:optimizer") for k in attrs)))
    ours, plain = restore_cma_state(hex_state, stored[-1].number, spec), pickle.loads(bytes.fromhex(hex_state))
    assert type(ours) is type(plain) and ours.generation == plain.generation >= 1
    assert (ours.mean == plain.mean).all() and (ours._C == plain._C).all() and ours._sigma == plain._sigma
    assert -1 <= study.ask().suggest_float("x", -1, 1) <= 1


def _submitted_result(tmp_path, micro_checkpoints, monkeypatch, payload):
    """A sweep (executor slurm) whose folder records one submitted job with ``payload`` as the
    result pickle submitit left for it; SLURM does not answer (no controller is needed)."""
    import json

    import submitit

    from harness.config import validate_config

    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: "")
    from tests.conftest import make_sweep_dict

    cfg = validate_config({**make_sweep_dict(micro_checkpoints, tmp_path), "executor": {"kind": "slurm"}})
    folder = cfg.resolved_output_dir() / "slurm"
    folder.mkdir(parents=True)
    (folder / "submitted.json").write_text(json.dumps({"version": 1, "jobs": {"k": {"job_id": "999_0", "title": "x"}}}))
    pickled = submitit.SlurmJob(folder=folder, job_id="999_0").paths.result_pickle
    pickled.write_bytes(pickle.dumps(("success", payload)))
    return cfg, pickled


def test_status_refuses_a_result_pickle_another_user_wrote(tmp_path, micro_checkpoints, monkeypatch):
    """``harness status`` of a sweep folder someone else wrote (a copied config's ``output_dir``)
    unpickled the job results there, running their code."""
    import os

    from harness.errors import HarnessError
    from harness.executors.slurm import status_table

    marker = tmp_path / "pwned"
    cfg, pickled = _submitted_result(tmp_path, micro_checkpoints, monkeypatch, _OpensFile(marker))
    other = pickled.stat().st_uid + 1
    monkeypatch.setattr(os, "getuid", lambda: other)
    with pytest.raises(HarnessError) as err:
        status_table(cfg)
    assert not marker.exists()
    assert str(err.value) == (f"{pickled}: written by another user (uid {other - 1}), not by a job of yours: refused "
                              "to unpickle it, as that would run code from the file (is output_dir someone else's?)")


def test_status_reads_a_result_pickle_of_ones_own_job(tmp_path, micro_checkpoints, monkeypatch):
    from harness.executors.slurm import status_table

    cfg, _ = _submitted_result(tmp_path, micro_checkpoints, monkeypatch, {"status": "ok"})
    _, counts = status_table(cfg)
    assert counts["done"] == 1


def test_a_line_break_in_a_slurm_output_dir_is_refused(tmp_path, micro_checkpoints, monkeypatch):
    """submitit writes the log paths under output_dir into the batch script (``#SBATCH
    --output='...'``): after a line break, the rest of the path was a line of its own, which the
    job's shell ran as a command."""
    import yaml
    from click.testing import CliRunner

    from harness.cli import main
    from tests.conftest import make_sweep_dict

    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: None)
    out = f"{tmp_path / 'out'}\ntouch {tmp_path / 'pwned'} #"
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump({**make_sweep_dict(micro_checkpoints, tmp_path), "output_dir": out,
                                 "executor": {"kind": "slurm"}}))
    for command in ("validate", "sweep"):
        r = CliRunner().invoke(main, [command, str(f)])
        assert r.exit_code == 2, r.output
        assert r.output == (f"error: {f}: output_dir: holds a line break, which would end its line of the jobs' "
                            "batch script: the rest of the path would run there as a shell command; rename it "
                            f"(got {out!r})\n")
    assert not Path(out).exists()


def test_validate_config_itself_refuses_a_line_break_in_a_slurm_output_dir(tmp_path, micro_checkpoints):
    """Code that runs ``run_sweep(validate_config(d))`` (a notebook, the tests) skipped the CLI's
    checks: the line break reached the batch script's ``#SBATCH --output`` line."""
    from harness.config import validate_config
    from harness.config_errors import ConfigError
    from tests.conftest import make_sweep_dict

    out = f"{tmp_path / 'out'}\ntouch {tmp_path / 'pwned'} #"
    d = {**make_sweep_dict(micro_checkpoints, tmp_path), "output_dir": out, "executor": {"kind": "slurm"}}
    with pytest.raises(ConfigError) as err:
        validate_config(d, "sweep.yaml")
    assert str(err.value) == ("sweep.yaml: output_dir: holds a line break, which would end its line of the jobs' "
                              f"batch script: the rest of the path would run there as a shell command; rename it "
                              f"(got {out!r})")
    local = validate_config({**d, "executor": {"kind": "local"}}, "sweep.yaml")
    assert local.output_dir == out  # only SLURM writes the path into a script line


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint"])
def test_a_slurm_option_expanding_to_a_line_break_is_refused(field, monkeypatch):
    """``${VAR}`` expanded after the one-word check: a variable holding a line break ended the
    ``#SBATCH`` line, and the job's shell ran the rest as a command."""
    from pydantic import ValidationError

    from harness.config import ExecutorSpec

    monkeypatch.setenv("SLURM_OPT", "gpu\ntouch /tmp/pwned #")
    with pytest.raises(ValidationError) as err:
        ExecutorSpec(kind="slurm", **{field: "${SLURM_OPT}"})
    assert "expands to 'gpu\\ntouch /tmp/pwned #', which is not one word (it holds whitespace)" in str(err.value)
    monkeypatch.setenv("SLURM_OPT", "gpu")
    assert getattr(ExecutorSpec(kind="slurm", **{field: "${SLURM_OPT}"}), field) == "gpu"


class _RunsShell:
    """A pickle that, when unpickled, runs a shell command creating the file it names."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_refused_checkpoint_names_the_global_it_would_have_called(tmp_path, zipped):
    """torch refuses a global of a blocked module (``os.system``) with a message the refusal did
    not recognize: it said only "(UnpicklingError)", not what in the file was refused."""
    import os

    import torch

    from harness.convert import convert_pickled_checkpoint
    from harness.errors import HarnessError
    from harness.models import load_state_dict

    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _RunsShell(marker)}, ckpt, _use_new_zipfile_serialization=zipped)
    called = f"{os.system.__module__}.{os.system.__name__}"
    with pytest.raises(HarnessError) as err:
        load_state_dict(ckpt)
    assert str(err.value).startswith(f"{ckpt}: refused to load: not a plain tensor checkpoint (")
    assert called in str(err.value) and "harness convert --trust-pickle" in str(err.value)
    with pytest.raises(HarnessError) as err:
        convert_pickled_checkpoint(ckpt, tmp_path / "out.safetensors")
    assert called in str(err.value) and "--trust-pickle" in str(err.value)
    assert not marker.exists()


class _CallsCmaesFunction:
    def __reduce__(self):
        import cmaes

        return cmaes.get_warm_start_mgd, ([],)


def test_cmaes_state_naming_a_function_of_cmaes_is_refused_before_it_is_called():
    """Only the ``cmaes`` package's classes belong in its optimizer's state: a function of it,
    which the pickle would call, is refused by name, not called."""
    import cmaes

    from harness.tuning import UntrustedStudyState, restore_cma_state

    with pytest.raises(UntrustedStudyState) as err:
        restore_cma_state(pickle.dumps(_CallsCmaesFunction()).hex(), 3, "journal:x")
    named = f"{cmaes.get_warm_start_mgd.__module__}.get_warm_start_mgd"
    assert f"(UnpicklingError: {named} is no part of a CMA-ES optimizer's state)" in str(err.value)


def test_cmaes_resumes_from_the_latest_generation_a_study_stored():
    """Each CMA-ES generation stores its optimizer in a trial: a resumed study goes on from the
    newest one (its latest generation), not the first, which would repeat the search from there."""
    import optuna

    from harness.tuning import cmaes_sampler, quiet_optuna

    quiet_optuna()
    sampler = cmaes_sampler(0, "journal:x")
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + t.suggest_float("y", -1, 1) ** 2, n_trials=20)

    def generation(trial) -> int:
        attrs = trial.system_attrs
        n = sum(k.startswith("cma:optimizer") for k in attrs)
        return pickle.loads(bytes.fromhex("".join(attrs[f"cma:optimizer:{i}"] for i in range(n)))).generation

    stored = [t for t in study.trials if any(k.startswith("cma:optimizer") for k in t.system_attrs)]
    assert generation(stored[0]) < generation(stored[-1]), "one generation in 20 trials"
    restored = sampler._restore_optimizer(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    assert restored.generation == generation(stored[-1])


def test_cmaes_state_that_is_only_a_numpy_array_is_refused_as_no_optimizer():
    """An array unpickles without running code, but it is no CMA-ES optimizer: the study fails
    naming the trial, not later inside Optuna on an attribute the array lacks."""
    import numpy as np

    from harness.tuning import UntrustedStudyState, restore_cma_state

    with pytest.raises(UntrustedStudyState, match=r"trial 3 holds a CMA-ES state that is not one \(it holds a ndarray\)"):
        restore_cma_state(pickle.dumps(np.arange(3)).hex(), 3, "journal:x")

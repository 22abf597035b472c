"""Schema bounds and command-line overrides of :mod:`harness.config` at their edges: the last
value accepted and the first refused, and overrides of fields the file leaves empty."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from harness.config import EXPERIMENT_FIELDS, dump_yaml, expand_env, expand_grid, load_config, validate_config
from harness.config_errors import ConfigError
from harness.sweep_file import apply_overrides

A, B, C = "toy_stripes", "toy_colours", "toy_checks"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("lambdas,fragment", [
    (10.5, "lambda 10.5 is outside [0, 10]"),
    ([0.3, -0.1], "lambda -0.1 is outside [0, 10]"),
    ([0.3, 0.6, 0.3], "a lambda is given twice"),  # two bound rows of one name, one job
])
def test_bound_lambdas_outside_the_range_or_repeated_are_refused(lambdas, fragment, sweep_dict):
    d = dict(sweep_dict, references={"perfect_routing": True, "routing_bound_lambda": lambdas})
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        validate_config(d)


def test_bound_lambdas_at_the_ends_of_the_range_are_kept_in_their_order(sweep_dict):
    d = dict(sweep_dict, references={"perfect_routing": True, "routing_bound_lambda": [10.0, 0.0]})
    assert validate_config(d).references.bound_lambdas == [10.0, 0.0]


@pytest.mark.parametrize("severity,ok", [(1, True), (5, True), (0, False), (6, False)])
def test_robustness_severity_is_one_of_the_five_levels(severity, ok, sweep_dict):
    d = dict(sweep_dict, robustness={"tasks": [A], "corruptions": ["contrast"], "severity": severity})
    if ok:
        assert validate_config(d).robustness.severity == severity
    else:
        with pytest.raises(ConfigError, match="robustness.severity"):
            validate_config(d)


def test_the_generalization_blocks_seen_tasks_follow_the_sweeps_task_order(sweep_dict):
    """Their columns and the order jobs see them in are the sweep's, however ``seen`` lists them."""
    d = dict(sweep_dict, tasks=[A, B, C], generalization={"seen": [C, A]})
    cfg = validate_config(d)
    assert cfg.generalization_seen == [A, C]


def test_a_sweep_whose_every_task_is_unseen_is_refused(sweep_dict):
    with pytest.raises(ConfigError, match="unseen: every task is unseen: nothing to merge"):
        validate_config(dict(sweep_dict, unseen=list(sweep_dict["tasks"])))


def test_a_tuned_range_must_be_wider_than_a_point(sweep_dict):
    space = {"scaling": {"type": "float", "low": 0.5, "high": 0.5}}
    with pytest.raises(ConfigError, match=r"low \(0.5\) must be below high \(0.5\)"):
        validate_config(dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": {"space": space}}]))


def write(d: dict, path) -> str:
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_an_override_one_past_the_last_list_item_is_one_line_naming_it(sweep_dict, tmp_path):
    n = len(sweep_dict["methods"])
    f = write(sweep_dict, tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=f"methods.{n}: no list item {n} \\(list has {n}\\)"):
        load_config(f, [f"methods.{n}.name=ties"])


@pytest.mark.parametrize("override", ["methods.7.name=ties", "name.x=3"])
def test_an_override_that_does_not_apply_names_the_command_line_once(override, sweep_dict, tmp_path):
    """As ``harness validate`` names it: loading a sweep (the diagnostics scripts) named it
    ``<command line> (..., over <command line> (..., over FILE))``."""
    f = write(sweep_dict, tmp_path / "s.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(f, [override])
    assert exc.value.file == f"<command line> ({override}, over {f})"


@pytest.mark.parametrize("override,field", [("methods.0.name=ties", "methods"), ("methods.0=ties", "methods"),
                                            ("robustness.tasks.0=toy_colours", "robustness.tasks")])
def test_an_override_of_an_item_of_a_list_the_file_lacks_names_the_list(override, field, sweep_dict, tmp_path):
    """A list item of a list not given is no item to set: it was made a mapping keyed '0', and the
    sweep refused as 'Input should be a valid list (got {'0': ...})'."""
    f = write({k: v for k, v in sweep_dict.items() if k != "methods"}, tmp_path / "s.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(f, [override])
    assert exc.value.path == f"{field}.0" and exc.value.file == f"<command line> ({override}, over {f})"
    assert exc.value.message == f"no list item 0 ({field} is not given: set the whole list, {field}=[...])"


def test_an_override_fills_a_block_the_file_leaves_empty(sweep_dict, tmp_path):
    """``generalization:`` with nothing after it reads as null: a field set in it makes the block."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, tasks=[A, B])) + "generalization:\n")
    cfg = load_config(f, [f"generalization.unseen=[{B}]"])
    assert cfg.generalization_seen == [A]


def test_an_empty_override_value_is_the_empty_string_not_null(sweep_dict, tmp_path):
    f = write(dict(sweep_dict, description="from the file"), tmp_path / "s.yaml")
    assert load_config(f, ["description="]).description == ""


def test_overrides_leave_the_callers_config_unchanged(sweep_dict):
    raw = {"seed": 1, "eval": {"batch_size": 8}}
    assert apply_overrides(raw, ["seed=2", "eval.batch_size=4", "eval.max_samples=3"]) == {
        "seed": 2, "eval": {"batch_size": 4, "max_samples": 3}}
    assert raw == {"seed": 1, "eval": {"batch_size": 8}}


def test_a_minimal_sweep_takes_the_documented_defaults(sweep_dict):
    """What a sweep file leaves out decides rows and studies: the README's defaults (pretrained and
    individual rows on, the bound off at lambda 0.3, severity 2, adaptation on the corrupted images)."""
    cfg = validate_config(dict(sweep_dict, robustness={"tasks": [A]}))
    refs = cfg.references
    assert (refs.pretrained, refs.individual, refs.perfect_routing, refs.bound_lambdas) == (True, True, False, [0.3])
    assert (cfg.robustness.severity, cfg.robustness.adapt) == (2, "corrupted")
    assert (cfg.executor.kind, cfg.executor.workers) == ("local", 1)


def _readme_defaults() -> dict[str, str]:
    """The defaults the README's example blocks state in their comments: ``key: v  # ... (default d)``,
    ``# d (the default) | ...``, or ``# the defaults`` for the line's own values."""
    found = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\s*(\w+): (.+?)\s+#(.*)$", line)
        if not m or "default" not in m.group(3):
            continue
        key, value, comment = m.groups()
        if comment.strip().startswith("the defaults"):
            found.update({f"{key}.{k}": str(v) for k, v in yaml.safe_load(value).items()})
        elif given := re.search(r"\(default (\w+)\)|; default (\w+)\)|^ default (\w+)$", comment):
            found[key] = next(g for g in given.groups() if g)
        elif given := re.search(r"(\w+) \(the default\)", comment):
            found[key] = given.group(1)
        elif "(the default;" in comment:
            found[key] = value
    return found


def test_a_minimal_sweep_takes_the_defaults_the_readme_states(sweep_dict):
    """Evaluation, tuning and SLURM fields a sweep file leaves out take the values the README's
    examples call the defaults."""
    documented = _readme_defaults()
    tuned = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": {"space": {
        "scaling": {"type": "float", "low": 0.1, "high": 0.5}}}}], executor={"kind": "slurm"})
    cfg = validate_config(tuned)
    tune = cfg.methods[0].tune
    taken = {"eval.batch_size": cfg.eval.batch_size, "eval.precision": cfg.eval.precision,
             "n_trials": tune.n_trials, "sampler": tune.sampler, "pruner": tune.pruner,
             "timeout_min": cfg.executor.timeout_min, "requeues": cfg.executor.requeues,
             "array_parallelism": cfg.executor.array_parallelism}
    assert {k: documented.get(k) for k in taken} == {k: str(v) for k, v in taken.items()}


def test_references_false_turns_every_reference_row_off(sweep_dict):
    refs = validate_config(dict(sweep_dict, references=False)).references
    assert (refs.pretrained, refs.individual, refs.perfect_routing) == (False, False, False)


def test_robustness_adapting_on_clean_images_keeps_the_identity_the_block_had_before_the_field(sweep_dict):
    """``adapt: clean`` is what jobs did before ``adapt`` existed: their keys must not change."""
    block = {"tasks": [A], "corruptions": ["contrast"], "severity": 3, "seed": 1}
    clean = validate_config(dict(sweep_dict, robustness={**block, "adapt": "clean"})).robustness.identity()
    corrupted = validate_config(dict(sweep_dict, robustness=block)).robustness.identity()
    assert clean == block
    assert corrupted == {**block, "adapt": "corrupted"}


def test_the_folders_and_store_default_to_the_documented_places(sweep_dict, tmp_path, monkeypatch):
    """``cache_dir`` over ``$HARNESS_CACHE`` over ``~/.cache/harness``; ``tracking_uri`` over
    ``MLFLOW_TRACKING_URI`` over ``sqlite:///<output_dir>/mlflow.db``; ``outputs/<name>``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HARNESS_CACHE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bare = {k: v for k, v in sweep_dict.items() if k not in ("output_dir", "cache_dir")}
    cfg = validate_config(bare)
    assert cfg.resolved_output_dir() == tmp_path / "outputs" / "toy"
    assert cfg.resolved_cache_dir() == tmp_path / "home" / ".cache" / "harness"
    assert cfg.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'outputs' / 'toy' / 'mlflow.db'}"
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert cfg.resolved_cache_dir() == tmp_path / "env-cache"
    assert cfg.resolved_tracking_uri() == "sqlite:///env.db"
    given = validate_config(dict(bare, cache_dir=str(tmp_path / "given"), tracking_uri="sqlite:///given.db"))
    assert given.resolved_cache_dir() == tmp_path / "given"
    assert given.resolved_tracking_uri() == "sqlite:///given.db"


def test_a_home_folder_in_a_path_field_is_expanded(sweep_dict, tmp_path, monkeypatch):
    """``~`` in a path field is the home folder, as in a shell, not a folder named ``~`` in the
    cwd: the sweep's folders and store, data folders (the sweep's and a task's own) and the model's
    files."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    model = {"source": "files", "arch": "harness-micro-vit", "pretrained": "~/ckpt/pre.safetensors",
             "finetuned_pattern": "~/ckpt/{task}.safetensors", "finetuned": {A: "~/ckpt/a.safetensors"},
             "heads": {A: "~/heads/a.safetensors"}}
    tasks = [{"name": A, "options": {"data_root": "~/own"}}, B]
    cfg = validate_config(dict(sweep_dict, output_dir="~/out", cache_dir="~/cache", tracking_uri="~/mlruns",
                               data_root="~/data", model=model, tasks=tasks))
    assert (cfg.output_dir, cfg.cache_dir, cfg.tracking_uri, cfg.data_root) == (
        f"{home}/out", f"{home}/cache", f"{home}/mlruns", f"{home}/data")
    assert cfg.resolved_output_dir() == home / "out" and cfg.resolved_cache_dir() == home / "cache"
    assert cfg.tasks[0].options["data_root"] == f"{home}/own"
    assert (cfg.model.pretrained, cfg.model.finetuned_pattern) == (f"{home}/ckpt/pre.safetensors",
                                                                   f"{home}/ckpt/{{task}}.safetensors")
    assert cfg.model.finetuned == {A: f"{home}/ckpt/a.safetensors"} and cfg.model.heads == {A: f"{home}/heads/a.safetensors"}


def test_a_tuned_range_cannot_be_both_log_scaled_and_stepped(sweep_dict):
    """Optuna has no log-scaled stepped range: the step would be dropped, or the first trial fail."""
    space = {"scaling": {"type": "float", "low": 0.1, "high": 0.9, "log": True, "step": 0.2}}
    with pytest.raises(ConfigError, match="methods.0.tune.space.scaling: 'step' and 'log' cannot be combined"):
        validate_config(dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": {"space": space}}]))


@pytest.mark.parametrize("threads,ok", [(1, True), (256, True), ("auto", True), (0, False), (257, False)])
def test_threads_are_1_to_256_or_auto(threads, ok, sweep_dict):
    if ok:
        assert validate_config(dict(sweep_dict, threads=threads)).threads == threads
    else:
        with pytest.raises(ConfigError, match="threads: must be between 1 and 256 or 'auto'"):
            validate_config(dict(sweep_dict, threads=threads))


def test_an_empty_seen_list_merges_nothing_and_is_refused(sweep_dict):
    """``seen: []`` is no task seen, not every task: it is refused like a sweep whose every task is unseen."""
    with pytest.raises(ConfigError, match="every task is unseen: nothing to merge"):
        validate_config(dict(sweep_dict, seen=[]))


def test_of_two_overrides_of_one_field_the_later_wins(sweep_dict, tmp_path):
    """As on any command line: ``seed=1 seed=2`` runs seed 2, and a whole list replaced then edited keeps the edit."""
    assert apply_overrides({"seed": 0}, ["seed=1", "seed=2"]) == {"seed": 2}
    f = write(sweep_dict, tmp_path / "s.yaml")
    cfg = load_config(f, ["methods.1.grid.scaling=[0.1, 0.3]", "methods.1.grid.scaling.1=0.4"])
    assert cfg.methods[1].grid["scaling"] == [0.1, 0.4]


def test_a_task_both_seen_and_unseen_is_refused(sweep_dict):
    with pytest.raises(ConfigError, match=r"unseen: tasks both seen and unseen: \['toy_colours'\]"):
        validate_config(dict(sweep_dict, tasks=[A, B], seen=[A, B], unseen=[B]))


def test_with_both_seen_and_unseen_given_a_task_in_neither_is_refused(sweep_dict):
    """Given both, each task is one of them; either alone leaves the rest to the other."""
    with pytest.raises(ConfigError, match=r"seen: tasks neither seen nor unseen: \['toy_checks'\]"):
        validate_config(dict(sweep_dict, tasks=[A, B, C], seen=[A], unseen=[B]))
    assert validate_config(dict(sweep_dict, tasks=[A, B, C], seen=[A])).merge_tasks == [A]
    assert validate_config(dict(sweep_dict, tasks=[A, B, C], unseen=[B])).merge_tasks == [A, C]


@pytest.mark.parametrize("change,same", [
    ({"seed": 1}, False), ({"tasks": [B, A]}, False), ({"unseen": [B]}, False), ({"eval": {"max_samples": 8}}, False),
    ({"eval": {"precision": "bf16"}}, False), ({"eval": {"precision": "fp16"}}, False),
    ({"adapt": {"shuffle_seed": 1}}, False),
    ({"executor": {"workers": 2}}, True), ({"eval": {"batch_size": 8}}, True), ({"description": "x"}, True),
    ({"threads": 2}, True), ({"methods": [{"name": "weight_averaging"}]}, True), ({"references": False}, True),
])
def test_the_digest_changes_with_what_is_measured_and_with_nothing_else(change, same, sweep_dict):
    """The digest finds a sweep's MLflow parent run: another experiment must not find it, and
    another way of running (or more methods) the same experiment must."""
    base = validate_config(dict(sweep_dict, tasks=[A, B]))
    assert (validate_config({**sweep_dict, "tasks": [A, B], **change}).digest() == base.digest()) is same


def test_the_resolved_config_written_out_reads_back_as_the_same_config(sweep_dict):
    """``resolved.yaml`` is what ``report`` and ``ui`` read a finished sweep from."""
    d = dict(sweep_dict, seed=3, threads=2, unseen=[B], references={"perfect_routing": True,
             "routing_bound_lambda": [0.3, 0.6]}, robustness={"tasks": [A], "adapt": "clean"},
             eval={"max_samples": 16, "precision": "bf16"}, executor={"kind": "slurm", "mem_gb": 2, "sbatch": {"gpus": 1}},
             methods=[{"name": "ties", "label": "t", "params": {"k": 20}, "grid": {"scaling": [0.3, 0.5]}},
                      {"name": "task_arithmetic", "tune": {"n_trials": 3, "sampler": "grid", "space": {
                          "scaling": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.2}}}}])
    cfg = validate_config(d)
    assert validate_config(yaml.safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize("field", ["seen", "unseen"])
def test_a_task_listed_twice_in_seen_or_unseen_is_refused(field, sweep_dict):
    """It would weigh twice in the seen average, or fill two unseen columns."""
    with pytest.raises(ConfigError, match=rf"{field}: listed twice: \['toy_colours'\]"):
        validate_config({**sweep_dict, "tasks": [A, B, C], field: [B, B]})


def test_a_set_variable_wins_over_its_default_and_an_empty_default_is_the_empty_string(monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_SET", "/data")
    monkeypatch.delenv("HARNESS_TEST_UNSET", raising=False)
    assert expand_env("${HARNESS_TEST_SET:-/elsewhere}/x") == "/data/x"
    assert expand_env("/a${HARNESS_TEST_UNSET:-}/b") == "/a/b"
    assert expand_env("${HARNESS_TEST_UNSET:-/elsewhere}/x") == "/elsewhere/x"


def test_a_variable_set_to_the_empty_string_takes_its_default_as_in_a_shell(monkeypatch):
    """``${VAR:-d}`` is ``d`` in bash for an unset and for an empty VAR (``export CKPT=`` in a job
    script); ``${VAR}`` of an empty VAR is empty, as there."""
    import subprocess

    monkeypatch.setenv("HARNESS_TEST_EMPTY", "")
    shell = subprocess.run(["bash", "-c", 'printf %s "${HARNESS_TEST_EMPTY:-/elsewhere}/x|/a${HARNESS_TEST_EMPTY}/b"'],
                           capture_output=True, text=True, check=True).stdout
    ours = expand_env("${HARNESS_TEST_EMPTY:-/elsewhere}/x") + "|" + expand_env("/a${HARNESS_TEST_EMPTY}/b")
    assert ours == shell == "/elsewhere/x|/a/b"


@pytest.mark.parametrize("form", ["${HARNESS_TEST_UNSET-/x}", "${HARNESS_TEST_UNSET:=/x}", "${HARNESS_TEST_UNSET:?no}",
                                  "${1X}", "${HARNESS_TEST_UNSET", "${HARNESS_TEST_UNSET:-${HOME}}"])
def test_a_brace_form_that_does_not_expand_is_refused_not_kept_as_text(form, sweep_dict, monkeypatch, tmp_path):
    """Only ``${VAR}`` and ``${VAR:-default}`` expand: another shell form (``${VAR-d}``) was kept
    as written, an output folder named ``${VAR-d}`` made in the current folder."""
    monkeypatch.delenv("HARNESS_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as exc:
        validate_config({**sweep_dict, "output_dir": f"{tmp_path}/{form}/out"})
    assert exc.value.path == "output_dir" and "does not expand" in exc.value.message, exc.value.line
    assert exc.value.value == f"{tmp_path}/{form}/out"
    monkeypatch.setenv("HARNESS_TEST_SET", "${kept}")  # a variable's own value is not read again
    assert expand_env("/a/${HARNESS_TEST_SET}") == "/a/${kept}"


def test_an_fp32_sweep_keeps_the_digest_it_had_before_precision_was_a_field(sweep_dict):
    """Sweeps run before ``eval.precision`` existed find their MLflow parent run again."""
    cfg = validate_config({**sweep_dict, "eval": {"precision": "fp32"}})
    before = json.dumps(cfg.model_dump(mode="json", include=EXPERIMENT_FIELDS), sort_keys=True)
    assert cfg.digest() == hashlib.sha256(before.encode()).hexdigest()[:16]


@pytest.mark.parametrize("mem_gb,ok", [(1 / 1024, True), (0.0009, False)])
def test_slurm_memory_of_one_megabyte_is_the_least_accepted(mem_gb, ok, sweep_dict):
    """submitit writes --mem=<int(mem_gb * 1024)>MB: 1 MB is a limit, 0 MB all of a node's memory."""
    d = {**sweep_dict, "executor": {"kind": "slurm", "mem_gb": mem_gb}}
    if ok:
        assert validate_config(d).executor.mem_gb == mem_gb
    else:
        with pytest.raises(ConfigError, match="executor.mem_gb: under 1 MB"):
            validate_config(d)


def test_a_generalization_block_giving_both_lists_must_place_every_task(sweep_dict):
    with pytest.raises(ConfigError, match=r"generalization.seen: tasks neither seen nor unseen: \['toy_checks'\]"):
        validate_config({**sweep_dict, "tasks": [A, B, C], "generalization": {"seen": [A], "unseen": [B]}})


def test_a_hyperparameter_both_fixed_and_tuned_is_refused(sweep_dict):
    """One of the two values would be silently dropped from every trial."""
    tune = {"space": {"scaling": {"type": "float", "low": 0.1, "high": 0.9}}}
    with pytest.raises(ConfigError, match=r"methods.0: \['scaling'\] given both in params and tune.space"):
        validate_config({**sweep_dict, "methods": [{"name": "task_arithmetic", "params": {"scaling": 0.3}, "tune": tune}]})


def test_an_override_of_a_field_of_a_task_given_by_name_alone_sets_it_on_that_task():
    """``tasks: [a, b]`` and ``tasks.0.options.data_root=/d``: the first task gets the folder, as a
    method given by name alone gets its params."""
    raw = {"tasks": [A, B], "methods": ["ties"]}
    assert apply_overrides(raw, ["tasks.0.options.data_root=/d", "methods.0.params.k=20"]) == {
        "tasks": [{"name": A, "options": {"data_root": "/d"}}, B], "methods": [{"name": "ties", "params": {"k": 20}}]}


def test_a_grid_expands_to_its_cartesian_product_in_yaml_order_over_the_fixed_params(sweep_dict):
    """Settings run and are listed as ``itertools.product`` of the grid's lists, the later key varying fastest."""
    grid = {"scaling": [0.3, 0.5], "merge_function": ["sum", "mean"]}
    m = validate_config(dict(sweep_dict, methods=[{"name": "ties", "params": {"k": 20}, "grid": grid}]))
    assert expand_grid(m.methods[0]) == [{"k": 20, "scaling": 0.3, "merge_function": "sum"},
                                         {"k": 20, "scaling": 0.3, "merge_function": "mean"},
                                         {"k": 20, "scaling": 0.5, "merge_function": "sum"},
                                         {"k": 20, "scaling": 0.5, "merge_function": "mean"}]


def test_the_resolved_config_written_out_states_the_values_the_file_left_to_defaults(sweep_dict):
    """A finished sweep is read back from it: what ran must not depend on a later version's defaults."""
    cfg = validate_config(sweep_dict)
    written = yaml.safe_load(dump_yaml(cfg))
    assert written == cfg.model_dump(mode="json")
    assert written["references"]["pretrained"] is True and written["eval"]["precision"] == "fp32"
    assert written["seed"] == cfg.seed and written["adapt"] == {"split": "test", "shuffle_seed": 0}


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint"])
def test_a_slurm_option_expanding_to_nothing_is_the_cluster_default(field, monkeypatch):
    """``${VAR:-}`` (or a variable set to the empty string) expanded to '', which went to sbatch as
    an option of the empty name (``--partition=''``, a partition the cluster lacks); it is unset."""
    from harness.config import ExecutorSpec, SweepConfig
    from harness.executors.slurm_settings import submitit_parameters

    monkeypatch.setenv("SLURM_OPT_EMPTY", "")
    for given in ("${SLURM_OPT_UNSET_HERE:-}", "${SLURM_OPT_EMPTY}"):
        spec = ExecutorSpec(kind="slurm", **{field: given})
        assert getattr(spec, field) is None
    cfg = SweepConfig.model_validate({"name": "s", "tasks": ["emb_mnist"],
                                      "executor": {"kind": "slurm", field: "${SLURM_OPT_EMPTY}"}})
    assert f"slurm_{field}" not in submitit_parameters(cfg)

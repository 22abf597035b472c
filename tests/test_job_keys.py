"""Job keys hold what decides a job's result and nothing else: a setting that only changes how a
job runs (a checkpoint interval, a kernel with the same outputs) finds the cached result."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from harness.config import validate_config
from harness.config_errors import ConfigError
from harness.plan import plan_jobs
from harness.runner import run_sweep
from methods.task_arithmetic import TaskArithmetic
from tests.conftest import make_sweep_dict

#: Keys of these jobs as they were before settings were left out of them (computed then): a job
#: cached at the defaults keeps its key.
PINNED = {"adamerging": "0e21e0214e949fb7211c", "wemoe": "dc1fa8bb99931d42534d"}  # at steps=5


def _keys(**extra: dict) -> dict[str, str]:
    """Key per method, for AdaMerging and WeMoE at steps=5 plus ``extra[name]`` params."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": name, "params": {"steps": 5, **extra.get(name, {})}} for name in ("adamerging", "wemoe")]
    return {label: key for (label, _), key in _planned(validate_config(d), "merge").items()}


def _planned(cfg, *kinds: str) -> dict[tuple[str, str | None], str]:
    """Key per (label, task) of the sweep's jobs (of ``kinds``, default all), with made-up model
    and task identities."""
    return {(s.label, s.task): s.key for s in plan_jobs(cfg, *_identities(cfg)) if not kinds or s.kind in kinds}


def _identities(cfg) -> tuple[dict, dict]:
    """Made-up model and task identities of the sweep's tasks."""
    identity = {"arch": "harness-micro-vit", "pretrained": "p" * 16, "heads": {},
                "finetuned": {t: t[:4] * 4 for t in cfg.task_names}}
    return identity, {t: {"name": t, "version": "1"} for t in cfg.task_names}


def test_keys_at_the_defaults_are_the_keys_cached_before():
    assert _keys() == PINNED


def test_checkpoint_interval_and_kernel_leave_the_key_alone():
    assert _keys(adamerging={"checkpoint_every": 1},
                 wemoe={"checkpoint_every": 0, "implementation": "weights"}) == PINNED


@pytest.mark.parametrize("name, setting", [
    ("adamerging", {"steps": 6}), ("adamerging", {"eval_every": 2}), ("wemoe", {"eval_every": 2}),
    ("wemoe", {"routing_stats_batches": 1}), ("wemoe", {"batch_reduce": True}), ("wemoe", {"batch_size": 8}),
])
def test_settings_that_change_a_result_change_the_key(name, setting):
    """Validation curves and pruning (eval_every), routing statistics, and the adaptation itself."""
    assert _keys(**{name: setting})[name] != PINNED[name]


def test_a_grid_over_a_runtime_only_setting_is_one_job_twice(tmp_path):
    d = make_sweep_dict(Path("/nonexistent"), tmp_path)
    d["methods"] = [{"name": "wemoe", "grid": {"checkpoint_every": [10, 20]}}]
    with pytest.raises(ConfigError, match=r"s.yaml: methods.0.grid: settings \{'checkpoint_every': 10\} and "
                                          r"\{'checkpoint_every': 20\} are the same setting once validated "
                                          r"\(checkpoint_every never changes a result\)"):
        validate_config(d, "s.yaml")


def test_a_new_checkpoint_interval_reuses_the_cached_adaptation(sweep_dict, monkeypatch):
    d = copy.deepcopy(sweep_dict)
    d["references"] = False
    d["methods"] = [{"name": "adamerging", "params": {"steps": 2, "batch_size": 4}}]
    first = run_sweep(validate_config(d), quiet=True)
    assert len(first.executed) == 1 and not first.failed

    def boom(*a, **k):
        raise AssertionError("a cached job was run again")

    monkeypatch.setattr("harness.executors.local.run_job", boom)
    d["methods"][0]["params"]["checkpoint_every"] = 1
    again = run_sweep(validate_config(d), quiet=True)
    assert again.executed == []
    [result] = again.results
    assert result.metrics == first.results[0].metrics
    assert result.params == {"steps": 2, "batch_size": 4, "checkpoint_every": 1}  # the setting the sweep gives now


#: The study definition of WeMoE at steps=5 tuned over lr, as it was before runtime_only params
#: were left out of definitions (computed then): its stored study is still resumed.
STUDY_PINNED = "9b715db53537"


def _study(params: dict, space: dict | None = None):
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    space = space or {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    d["methods"] = [{"name": "wemoe", "params": {"steps": 5, **params},
                     "tune": {"n_trials": 2, "objective": "val/acc/avg", "space": space}}]
    return validate_config(d, "s.yaml").methods[0]


def test_a_runtime_only_setting_leaves_the_study_definition_alone():
    """Changing checkpoint_every resumes the study (its trials' keys are unchanged too), not a new
    study of the same search whose trials run again."""
    from harness.tuning import study_definition

    assert study_definition(_study({})) == STUDY_PINNED
    assert study_definition(_study({"checkpoint_every": 7, "implementation": "weights"})) == STUDY_PINNED
    assert study_definition(_study({"steps": 6})) != STUDY_PINNED


def test_two_spellings_of_one_fixed_setting_are_one_label():
    """steps: 4.0 (an int field) and ties' k: 50 (a float field) are the jobs of steps: 4 and k: 50.0:
    their run names, progress lines and table rows read as the method holds the values, and MLflow's
    job.params too, whichever spelling the sweep used (a YAML 1.1 string '1e-3' included)."""
    from harness.runner import job_params
    from harness.tracking import flatten

    def titles(steps, lr, k):
        d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
        d["methods"] = [{"name": "adamerging", "params": {"steps": steps}, "grid": {"lr": [lr, 1e-2]}},
                        {"name": "ties", "params": {"k": k}}]
        cfg = validate_config(d)
        specs = [s for s in plan_jobs(cfg) if s.kind == "merge"]
        return [(s.title, flatten(job_params(cfg, s)["job"]["params"])) for s in specs]  # as MLflow logs them

    assert titles(4.0, "1e-3", 50) == titles(4, 0.001, 50.0) == [
        ("adamerging(steps=4, lr=0.001)", {"steps": "4", "lr": "0.001"}),
        ("adamerging(steps=4, lr=0.01)", {"steps": "4", "lr": "0.01"}),
        ("ties(k=50.0)", {"k": "50.0"})]


def test_an_added_hyperparameter_at_its_default_leaves_the_study_definition_alone():
    """diversity_weight: 0.0 written out is the job key of the study's trials without it (at its
    default an added hyperparameter is left out of keys): the same study, as runtime_only ones are."""
    from harness.tuning import study_definition

    assert study_definition(_study({"diversity_weight": 0.0})) == STUDY_PINNED
    assert study_definition(_study({"diversity_weight": 0.5})) != STUDY_PINNED


def test_tuning_a_runtime_only_setting_is_refused():
    with pytest.raises(ConfigError, match=r"s.yaml: methods.0.tune.space.checkpoint_every: hyperparameter "
                                          r"'checkpoint_every' of 'wemoe' never changes a result \(runtime_only\)"):
        _study({}, space={"checkpoint_every": {"type": "int", "low": 1, "high": 10}})


def test_two_spellings_of_one_fixed_setting_are_one_study():
    """steps: 5 in the file and steps=5.0 on the command line (or 4e0 / 1e-3 as YAML 1.1 strings)
    validate to the same method, and their trials to the same job keys: one study, resumed, not a
    new one whose trials all run again. A different value is still another study."""
    from harness.tuning import study_definition

    assert study_definition(_study({"steps": 5.0})) == STUDY_PINNED
    assert study_definition(_study({"init_lambda": 0.3})) == study_definition(_study({"init_lambda": "3e-1"}))
    assert study_definition(_study({"steps": 6.0})) != STUDY_PINNED
    ints = {"router_depth": {"type": "categorical", "choices": [1, 2]}}
    floats = {"router_depth": {"type": "categorical", "choices": [1.0, 2.0]}}
    assert study_definition(_study({}, ints)) == study_definition(_study({}, floats))


def _plan(**changes: object) -> dict[tuple[str, str | None], str]:
    """Key per (label, task) of a sweep with references, a plain merge and WeMoE with and without
    ``batch_reduce``, the sweep given ``changes``."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["references"] = {"perfect_routing": True}
    d["methods"] = [{"name": "weight_averaging"}, {"name": "wemoe", "params": {"steps": 5}},
                    {"name": "wemoe", "label": "batch", "params": {"steps": 5, "batch_reduce": True}}]
    return _planned(validate_config({**d, **changes}))


def _changed(**changes: object) -> set[tuple[str, str | None]]:
    before, after = _plan(), _plan(**changes)
    return {job for job, key in before.items() if after[job] != key}


def test_the_evaluation_batch_size_is_in_the_key_of_a_batch_dependent_model_only():
    """WeMoE's ``batch_reduce`` routes each image by its batch's mean: another evaluation batch
    size scores other predictions (measured on the quick suite: emb_fashion 15.0 at 256, 14.0 at
    1), so a cached result must not stand for it. For the others it changes only the speed."""
    assert _changed(eval={"batch_size": 64}) == {("batch", None)}


def test_adaptation_data_are_in_the_keys_of_test_time_adaptation_only():
    """``adapt`` is what ``ctx.unlabeled`` streams: a method that reads no test data cannot
    depend on it, and its cached result stands."""
    assert _changed(adapt={"shuffle_seed": 1}) == {("wemoe", None), ("batch", None)}


def test_the_seed_is_in_the_keys_of_seeded_merges_only():
    """Reference rows and methods declared ``seeded = False`` (weight averaging here) draw
    nothing: a reseeded sweep finds them cached."""
    assert _changed(seed=1) == {("wemoe", None), ("batch", None)}


class NoisyTaskArithmetic(TaskArithmetic):
    """A subclass that draws from the seed (noise on the merged weights) without redeclaring
    ``seeded``: it must not inherit its parent's ``seeded = False``."""

    def merge(self, pretrained, finetuned, ctx):
        merged = super().merge(pretrained, finetuned, ctx)
        with torch.no_grad():
            for p in merged.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(ctx.seed)))
        return merged


def test_only_a_class_s_own_seeded_false_leaves_the_seed_out_of_its_keys():
    """AdaMerging declares it (its start is init_lambda, its batches adapt.shuffle_seed's), so a
    reseeded sweep finds it cached; a subclass of task arithmetic that does not declare it gets the
    seed in its keys, as any method does, though its parent leaves it out."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": "task_arithmetic"}, {"name": "adamerging", "params": {"steps": 5}},
                    {"name": "tests.test_job_keys:NoisyTaskArithmetic", "label": "noisy"}]
    before, after = _planned(validate_config(d)), _planned(validate_config({**d, "seed": 1}))
    assert {job for job, key in before.items() if after[job] != key} == {("noisy", None)}


def test_a_study_of_a_batch_reduced_wemoe_is_measured_at_its_evaluation_batch_size():
    """A trial of WeMoE with ``batch_reduce`` scores each image by its batch's mean routing: a
    sweep evaluating in other batches must not resume the study whose trials were scored so
    (its best would be picked on other scores). Other studies resume whatever the batch size."""
    from harness.tuning import study_measures

    def measures(params: dict, batch_size: int, space: dict | None = None) -> str:
        d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
        d["eval"] = {**d.get("eval", {}), "batch_size": batch_size}
        d["methods"] = [{"name": "wemoe", "params": {"steps": 5, **params},
                         "tune": {"n_trials": 2, "objective": "val/acc/avg",
                                  "space": space or {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}}]
        cfg = validate_config(d, "s.yaml")
        return study_measures(cfg, cfg.methods[0], *_identities(cfg))

    assert measures({}, 64) == measures({}, 256)
    assert measures({"batch_reduce": True}, 64) != measures({"batch_reduce": True}, 256)
    tuned = {"batch_reduce": {"type": "categorical", "choices": [False, True]}}
    assert measures({}, 64, tuned) != measures({}, 256, tuned)


def test_planning_a_grid_expands_it_once(monkeypatch):
    """Each job's key asked whether its method runs the robustness study itself by expanding the
    method's whole grid again: planning N grid points built N^2 settings (3000 points: 2.9 s, 10000:
    22 s). Planning builds each grid's settings once now, and a one-setting grid still runs it."""
    import harness.config
    import harness.plan
    from harness.plan import robustness_inline

    built = []
    real = harness.config.expand_grid

    def counted(m):
        settings = real(m)
        built.append(len(settings))
        return settings

    monkeypatch.setattr(harness.plan, "expand_grid", counted)
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.01 * i for i in range(1, 41)]}},
                    {"name": "ties", "grid": {"k": [10, 20], "scaling": [0.3, 0.5, 0.7]}},
                    {"name": "ties", "label": "one", "grid": {"k": [10], "scaling": [0.3]}}]
    cfg = validate_config(d)
    merges = [s for s in plan_jobs(cfg, *_identities(cfg)) if s.kind == "merge"]
    assert len(merges) == 40 + 6 + 1
    assert sum(built) == len(merges)
    assert [robustness_inline(cfg, label) for label in ("task_arithmetic", "ties", "one")] == [False, False, True]


def _planned_with(cfg, identity: dict, task_identity: dict) -> dict[tuple[str, str | None], str]:
    return {(s.label, s.task): s.key for s in plan_jobs(cfg, identity, task_identity)}


def test_each_model_file_and_task_is_in_the_keys_of_the_jobs_that_read_it():
    """A replaced checkpoint (or task data) reruns exactly the jobs that load it: an individual
    row reads its own task's encoder; a bound row builds task arithmetic over every merged task's
    encoder, then its task's MLPs; merges read every merged task's; the pretrained row reads none.
    Every job reads the pretrained model and the heads."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["references"] = {"perfect_routing": True}
    d["methods"] = [{"name": "weight_averaging"}, {"name": "wemoe", "params": {"steps": 5}}]
    cfg = validate_config(d)
    first, second = cfg.task_names
    identity, task_identity = _identities(cfg)
    before = _planned_with(cfg, identity, task_identity)
    jobs = set(before)
    assert {("individual", first), ("individual", second), ("pretrained", None)} <= jobs

    def changed(identity_now: dict, task_identity_now: dict) -> set:
        after = _planned_with(cfg, identity_now, task_identity_now)
        assert set(after) == jobs
        return {job for job, key in before.items() if after[job] != key}

    replaced = {**identity, "finetuned": {**identity["finetuned"], first: "f" * 16}}
    assert changed(replaced, task_identity) == jobs - {("pretrained", None), ("individual", second)}
    assert changed({**identity, "pretrained": "q" * 16}, task_identity) == jobs
    assert changed({**identity, "heads": {first: "h" * 16}}, task_identity) == jobs
    other_data = {**task_identity, first: {"name": first, "version": "2"}}
    assert changed(identity, other_data) == {job for job in jobs if job[1] in (None, first)}


def _study_keys(**robustness: object) -> dict[tuple[str, str | None], str]:
    """Keys of a sweep with a robustness block given ``robustness``: references, a single-setting
    merge and WeMoE (which run the study themselves), a grid (its setting's study is a follow-up job)."""
    from harness.plan import robustness_spec

    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": "weight_averaging"}, {"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}},
                    {"name": "wemoe", "params": {"steps": 5}}]
    d["robustness"] = {"tasks": d["tasks"][:1], "corruptions": ["contrast"], "severity": 2, **robustness}
    cfg = validate_config(d)
    keys = {(s.label, s.task, s.params.get("scaling")): s.key for s in plan_jobs(cfg, *_identities(cfg))}
    keys["robustness", None, 0.2] = robustness_spec(cfg, "task_arithmetic", {"scaling": 0.2}, *_identities(cfg)).key
    return keys


def test_the_robustness_block_is_in_the_keys_of_the_jobs_that_run_the_study():
    """Another severity, corruption, corruption seed or task set is another study: the pretrained
    row, the single-setting merge, WeMoE and a grid's follow-up study run again; the individual
    rows and the grid's points (scored clean only) stay cached. Adapting on clean images instead
    of each corruption changes only what WeMoE does."""
    before = _study_keys()
    studies = {("pretrained", None, None), ("weight_averaging", None, None), ("wemoe", None, None),
               ("robustness", None, 0.2)}

    def changed(**robustness: object) -> set:
        after = _study_keys(**robustness)
        return {job for job, key in before.items() if after[job] != key}

    for change in ({"severity": 3}, {"corruptions": ["fog"]}, {"seed": 1}, {"tasks": ["toy_colours"]}):
        assert changed(**change) == studies, change
    assert changed(adapt="clean") == {("wemoe", None, None)}


def test_a_trials_key_holds_its_study_and_its_number():
    """Two trials asking the same setting (a categorical space, a grid sampler rerun) are two jobs:
    a trial's result holds its study's pruning decisions, so neither is the other's cached result."""
    from harness.plan import JobSpec, with_key

    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    cfg = validate_config(d)

    def key(study: str, number: int) -> str:
        spec = JobSpec("trial", "task_arithmetic", method="task_arithmetic", params={"scaling": 0.3},
                       trial={"study_name": study, "number": number})
        return with_key(cfg, spec, *_identities(cfg)).key

    assert len({key("s", 0), key("s", 1), key("t", 0)}) == 3


def test_a_trials_key_holds_the_seed_of_a_seeded_merge_only():
    """A trial's key also measures its study (``harness.tuning.study_measures``): reseeded, a
    seeded merge's trial merges otherwise, so it neither resumes the old study (its sampler seed
    fixed by ``tune.seed``) nor finds the old trial's result cached. An unseeded merge's trial does."""
    from harness.plan import JobSpec, with_key

    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))

    def key(method: str, seed: int) -> str:
        cfg = validate_config({**d, "seed": seed})
        spec = JobSpec("trial", method, method=method, params={"steps": 5} if method == "wemoe" else {},
                       trial={"study_name": "s", "number": 0})
        return with_key(cfg, spec, *_identities(cfg)).key

    assert key("wemoe", 0) != key("wemoe", 1)
    assert key("weight_averaging", 0) == key("weight_averaging", 1)


def test_each_part_of_a_search_is_in_its_study_definition():
    """Another space, objective, sampler, sampler seed or method code is another search: its
    study is not resumed (its best would be picked by the old search), each changed alone."""
    from harness.tuning import study_definition

    lr = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}

    def definition(tune: dict | None = None, method_id: str | None = None) -> str:
        d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
        d["methods"] = [{"name": "wemoe", "params": {"steps": 5},
                         "tune": {"n_trials": 2, "objective": "val/acc/avg", "space": {"lr": lr}, **(tune or {})}}]
        return study_definition(validate_config(d, "s.yaml").methods[0], 0, method_id)

    base = definition()
    others = [definition({"space": {"lr": {**lr, "high": 2e-2}}}), definition({"objective": "val/acc/toy_stripes"}),
              definition({"sampler": "random"}), definition({"seed": 3}), definition(method_id="methods.wemoe:WeMoE@0")]
    assert base not in others and len(set(others)) == len(others)
    assert definition({"n_trials": 5}) == base  # more trials extend the study


def test_the_task_order_is_in_the_key_of_an_order_dependent_merge():
    """WeMoE's expert i is the i-th task's: the same seeded routers over the tasks in another order
    are another model, so a sweep listing its tasks in another order does not reuse its result.
    The individual rows read one task each and stay cached."""
    before = _plan()
    reordered = _plan(tasks=list(reversed(make_sweep_dict(Path("/n"), Path("/o"))["tasks"])))
    assert before[("wemoe", None)] != reordered[("wemoe", None)]
    assert all(before[job] == reordered[job] for job in before if job[0] == "individual")


def test_a_robustness_jobs_key_holds_its_setting_method_and_checkpoints():
    """A grid's follow-up study scores the merged model of the setting chosen on val: another
    chosen setting, another method or a replaced checkpoint is another study, never the cached
    one; a label is no part of it (two labels choosing one setting share the job)."""
    from harness.plan import robustness_spec

    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}},
                    {"name": "task_arithmetic", "label": "tb", "grid": {"scaling": [0.6, 1.0]}},
                    {"name": "ties", "grid": {"k": [10, 20], "scaling": [0.6]}}]
    d["robustness"] = {"tasks": d["tasks"][:1], "corruptions": ["contrast"], "severity": 2}
    cfg = validate_config(d)
    identity, task_identity = _identities(cfg)

    def key(label: str, params: dict, ident: dict = identity) -> str:
        return robustness_spec(cfg, label, params, ident, task_identity).key

    base = key("task_arithmetic", {"scaling": 0.6})
    replaced = {**identity, "finetuned": {**identity["finetuned"], cfg.task_names[0]: "f" * 16}}
    others = [key("task_arithmetic", {"scaling": 0.2}), key("ties", {"k": 20, "scaling": 0.6}),
              key("task_arithmetic", {"scaling": 0.6}, replaced)]
    assert base not in others and len(set(others)) == len(others)
    assert key("tb", {"scaling": 0.6}) == base


def test_a_grid_of_a_test_time_adaptation_method_runs_the_study_in_each_job():
    """Adapting again for a follow-up study would cost more than the study itself: each grid
    point of WeMoE runs it, so the robustness block is in each point's key, and no follow-up job
    is planned for it; a grid of task arithmetic leaves it to its follow-up job."""
    from harness.plan import robustness_inline

    def keys(severity: int) -> dict[tuple[str, float], str]:
        d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
        d["methods"] = [{"name": "wemoe", "params": {"steps": 5}, "grid": {"lr": [1e-3, 1e-2]}},
                        {"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}}]
        d["robustness"] = {"tasks": d["tasks"][:1], "corruptions": ["contrast"], "severity": severity}
        cfg = validate_config(d)
        assert [robustness_inline(cfg, label) for label in ("wemoe", "task_arithmetic")] == [True, False]
        return {(s.label, s.params.get("lr", s.params.get("scaling"))): s.key
                for s in plan_jobs(cfg, *_identities(cfg)) if s.kind == "merge"}

    before, after = keys(2), keys(3)
    assert {job for job in before if after[job] != before[job]} == {("wemoe", 1e-3), ("wemoe", 1e-2)}


def test_individual_rows_are_planned_for_the_tasks_with_a_checkpoint():
    """A task without a fine-tuned checkpoint (an unseen task of the generalization block) has
    no individual row once the models are known; before that, the plan lists every task's."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["references"] = {"pretrained": False, "individual": True}
    d["methods"] = []
    cfg = validate_config(d)
    first, second = cfg.task_names
    identity, task_identity = _identities(cfg)
    identity["finetuned"] = {first: identity["finetuned"][first]}
    assert [(s.kind, s.task) for s in plan_jobs(cfg, identity, task_identity)] == [("individual", first)]
    assert [(s.kind, s.task) for s in plan_jobs(cfg)] == [("individual", first), ("individual", second)]


def test_each_bound_lambda_is_its_own_row_and_job():
    """Perfect-routing bounds at two lambdas are two rows, labelled by their lambda, whose
    results differ: each (lambda, task) is its own job; one lambda is the plain row."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = []
    d["references"] = {"pretrained": False, "individual": False, "perfect_routing": True,
                       "routing_bound_lambda": [0.3, 0.6]}
    cfg = validate_config(d)
    keys = _planned(cfg)
    assert set(keys) == {(f"perfect routing ({x})", t) for x in ("0.3", "0.6") for t in cfg.task_names}
    assert len(set(keys.values())) == 4
    d["references"]["routing_bound_lambda"] = 0.3
    assert set(_planned(validate_config(d))) == {("perfect routing", t) for t in cfg.task_names}


def test_the_evaluation_subset_size_is_in_every_key():
    """``eval.max_samples`` scores each job on another subset: another size is another result."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    keys = [_planned(validate_config({**d, "eval": {"max_samples": n}})) for n in (None, 8, 16)]
    for job in keys[0]:
        assert len({k[job] for k in keys}) == 3, job


def test_generalization_jobs_leave_the_robustness_study_to_the_main_jobs():
    """The study runs on the main protocol's jobs only: another severity reruns them and leaves
    the generalization jobs (merged on the seen tasks, scored clean) cached."""
    from harness.plan import generalization_label

    def keys(severity: int) -> dict[tuple[str, str | None], str]:
        d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
        d["references"] = {"pretrained": False, "individual": False}
        d["methods"] = [{"name": "weight_averaging"}]
        d["generalization"] = {"unseen": d["tasks"][1:]}
        d["robustness"] = {"tasks": d["tasks"][:1], "corruptions": ["contrast"], "severity": severity}
        return _planned(validate_config(d))

    before, after = keys(2), keys(3)
    assert set(before) == {("weight_averaging", None), (generalization_label("weight_averaging"), None)}
    assert {job for job in before if after[job] != before[job]} == {("weight_averaging", None)}


def test_bound_rows_are_planned_for_the_merged_tasks_only():
    """A perfect-routing bound routes each merged task to its own fine-tuned MLPs: an unseen task
    has none, so it gets no bound row (it is scored in each merge's row)."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = []
    d["references"] = {"pretrained": False, "individual": False, "perfect_routing": True}
    d["unseen"] = d["tasks"][1:]
    cfg = validate_config(d)
    assert [(s.kind, s.task) for s in plan_jobs(cfg)] == [("perfect_routing", d["tasks"][0])]


def test_a_tuned_method_gets_no_grid_job():
    """A tuned method's jobs are its study's trials and final run (harness.tuning), planned
    there: the plan holds none of its own, while a grid method beside it gets its job."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["references"] = {"pretrained": False, "individual": False}
    d["methods"] = [{"name": "task_arithmetic", "label": "tuned", "tune": {
                        "n_trials": 2, "objective": "val/acc/avg",
                        "space": {"scaling": {"type": "float", "low": 0.1, "high": 1.0}}}},
                    {"name": "weight_averaging"}]
    assert [(s.kind, s.label) for s in plan_jobs(validate_config(d))] == [("merge", "weight_averaging")]


def test_a_generalization_jobs_key_holds_the_checkpoints_of_its_seen_tasks_only():
    """A generalization job merges the seen tasks' encoders and scores the unseen task with the
    merged model, never loading its checkpoint: replacing that checkpoint reruns the main merge
    (which merges it) and leaves the generalization job cached; replacing a seen one reruns both."""
    from harness.plan import generalization_label

    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["references"] = {"pretrained": False, "individual": False}
    d["methods"] = [{"name": "weight_averaging"}]
    d["generalization"] = {"unseen": d["tasks"][1:]}
    cfg = validate_config(d)
    seen, unseen = cfg.task_names
    identity, task_identity = _identities(cfg)
    before = _planned_with(cfg, identity, task_identity)
    main_job, gen_job = ("weight_averaging", None), (generalization_label("weight_averaging"), None)
    assert set(before) == {main_job, gen_job}

    def changed(task: str) -> set:
        replaced = {**identity, "finetuned": {**identity["finetuned"], task: "f" * 16}}
        after = _planned_with(cfg, replaced, task_identity)
        return {job for job, key in before.items() if after[job] != key}

    assert changed(unseen) == {main_job}
    assert changed(seen) == {main_job, gen_job}


def test_moving_an_unseen_task_in_the_task_list_leaves_the_generalization_job_cached():
    """The generalization job merges the seen tasks in their order, which moving the unseen task
    leaves as it is: its key stays, while the main merge (all three tasks, in a new order) changes."""
    from harness.plan import generalization_label

    def keys(tasks: list[str]) -> dict[tuple[str, str | None], str]:
        d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
        d["tasks"] = tasks
        d["references"] = {"pretrained": False, "individual": False}
        d["methods"] = [{"name": "weight_averaging"}]
        d["generalization"] = {"unseen": ["toy_checks"]}
        return _planned(validate_config(d))

    before = keys(["toy_stripes", "toy_colours", "toy_checks"])
    after = keys(["toy_stripes", "toy_checks", "toy_colours"])
    gen = (generalization_label("weight_averaging"), None)
    assert after[gen] == before[gen]
    assert after[("weight_averaging", None)] != before[("weight_averaging", None)]


def test_keys_on_an_evaluation_subset_are_the_keys_cached_before():
    """A sweep scored on ``eval.max_samples`` images keeps the keys its cached results were
    stored under (computed then): any change to how the subset enters a key reruns every job."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": "weight_averaging"}]
    d["eval"] = {"max_samples": 8}
    assert _planned(validate_config(d)) == {
        ("pretrained", None): "0941e5cb9dddedbd15ff", ("individual", "toy_stripes"): "27d9196020ca159ef5d8",
        ("individual", "toy_colours"): "343193169edd88d11ee4", ("weight_averaging", None): "4aa70b170cb12fa638ea"}


def test_a_bound_rows_key_holds_the_checkpoints_of_the_merged_tasks_only():
    """A perfect-routing bound builds task arithmetic over the merged tasks' encoders, never
    loading an unseen task's: replacing that checkpoint leaves the bound cached."""
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = []
    d["references"] = {"pretrained": False, "individual": False, "perfect_routing": True}
    d["unseen"] = d["tasks"][1:]
    cfg = validate_config(d)
    seen, unseen = cfg.task_names
    identity, task_identity = _identities(cfg)
    before = _planned_with(cfg, identity, task_identity)
    assert set(before) == {("perfect routing", seen)}

    def after(task: str) -> dict:
        return _planned_with(cfg, {**identity, "finetuned": {**identity["finetuned"], task: "f" * 16}}, task_identity)

    assert after(unseen) == before
    assert after(seen) != before


def test_a_plan_shown_before_any_model_is_hashed_counts_an_unseen_tasks_individual_row():
    """The dry run numbers jobs by keys computed without models: an unseen task with a checkpoint
    still has its individual row, which must get a key of its own there too, not fail the plan."""
    from harness.plan import setting_key

    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": "weight_averaging"}, {"name": "weight_averaging", "label": "again"}]
    d["unseen"] = d["tasks"][1:]
    cfg = validate_config(d)
    specs = plan_jobs(cfg)
    assert [(s.kind, s.task) for s in specs if s.kind == "individual"] == [("individual", t) for t in d["tasks"]]
    keys = [setting_key(cfg, s) for s in specs]
    assert len(keys) == 5 and len(set(keys)) == 4  # two labels of one setting: one job


def test_a_reseeded_sweep_finds_an_unseeded_grids_robustness_job_cached():
    """The robustness job of a grid's selected setting merges again as its grid point did: a
    method that draws nothing (task arithmetic) keeps the seed out of that key too; a seeded one
    (a subclass not declaring ``seeded``) has it in both."""
    from harness.plan import robustness_spec

    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}},
                    {"name": "tests.test_job_keys:NoisyTaskArithmetic", "label": "noisy",
                     "grid": {"scaling": [0.2, 0.6]}}]
    d["robustness"] = {"tasks": d["tasks"][:1], "corruptions": ["contrast"], "severity": 2}

    def keys(seed: int) -> list[str]:
        cfg = validate_config({**d, "seed": seed})
        return [robustness_spec(cfg, label, {"scaling": 0.2}, *_identities(cfg)).key
                for label in ("task_arithmetic", "noisy")]

    (plain, noisy), (plain_reseeded, noisy_reseeded) = keys(0), keys(1)
    assert plain == plain_reseeded and noisy != noisy_reseeded

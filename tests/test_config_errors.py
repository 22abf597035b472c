"""Bad sweep files: each mistake refused with one line naming file, field and value (every schema
mistake of a file at once, a line each); exit 2; no traceback."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.cli import main


def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    parts = path.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {})
    if value is _DELETE:
        del cur[parts[-1]]
    elif isinstance(cur, list):
        cur[int(parts[-1])] = value
    else:
        cur[parts[-1]] = value
    return d


_DELETE = object()

# (id, edit applied to a valid sweep dict: (path, value), expected fragments of the message)
CASES = [
    ("missing-tasks", ("tasks", _DELETE), ["tasks: required field is missing"]),
    ("unknown-top-key", ("methodz", []), ["methodz: unknown key"]),
    ("unknown-nested-key", ("model.archh", "x"), ["model.archh: unknown key"]),
    ("seed-type", ("seed", "abc"), ["seed:", "'abc'"]),
    ("seed-bool", ("seed", True), ["seed: expects a number, not the boolean true"]),
    ("workers-bool", ("executor.workers", True), ["executor.workers: expects a number, not the boolean true"]),
    ("hparam-bool", ("methods.1", {"name": "task_arithmetic", "params": {"scaling": True}}),
     ["methods.1.params.scaling: expects a number, not the boolean true"]),
    ("grid-bool", ("methods.1.grid.scaling", [0.2, False]),
     ["methods.1.grid.scaling: expects a number, not the boolean false"]),
    ("seed-negative", ("seed", -3), ["seed:", "greater than or equal to 0", "-3"]),
    ("batch-size-zero", ("eval.batch_size", 0), ["eval.batch_size:", "greater than or equal to 1", "(got 0)"]),
    ("device", ("device", "tpu"), ["device: must be auto, cpu, cuda, cuda:N (the GPU of index N) or mps (got 'tpu')"]),
    ("device-case", ("device", "CUDA"),
     ["device: must be auto, cpu, cuda, cuda:N (the GPU of index N) or mps (got 'CUDA')"]),
    ("unknown-method", ("methods.0.name", "nope"), ["methods.0.name: unknown method 'nope'"]),
    ("unknown-hparam", ("methods.1.params", {"lamda": 0.3}),
     ["methods.1.params.lamda: method 'task_arithmetic' has no hyperparameter 'lamda'"]),
    ("hparam-range", ("methods.1", {"name": "task_arithmetic", "params": {"scaling": -1}}), ["methods.1.params.scaling:", "(got -1)"]),
    ("grid-range", ("methods.1.grid.scaling", [0.2, 50]), ["methods.1.grid.scaling:", "(got 50)"]),
    ("grid-type", ("methods.1.grid.scaling", [0.2, "big"]), ["methods.1.grid.scaling:", "'big'"]),
    ("grid-empty", ("methods.1.grid.scaling", []), ["methods.1.grid:", "grid for 'scaling' is empty"]),
    ("unknown-task", ("tasks", ["toy_stripes", "nope_task"]), ["tasks.1: unknown task", "'nope_task'"]),
    ("duplicate-task", ("tasks", ["toy_stripes", "toy_stripes"]), ["tasks:", "tasks listed twice"]),
    ("files-without-pretrained", ("model.pretrained", None), ["model:", "needs 'pretrained'"]),
    ("env-unset", ("model.pretrained", "${HARNESS_TEST_UNSET_VAR}/p.safetensors"),
     ["model.pretrained:", "environment variable HARNESS_TEST_UNSET_VAR is not set"]),
    ("pattern-without-task", ("model.finetuned_pattern", "/tmp/x.safetensors"),
     ["model.finetuned_pattern:", "must contain '{task}'"]),
    ("pattern-other-field", ("model.finetuned_pattern", "/tmp/{task}/finetuned{v2}.safetensors"),
     ["model.finetuned_pattern: has the field '{v2}'; the only field is '{task}'"]),
    ("pattern-positional-field", ("model.finetuned_pattern", "/tmp/{0}/{task}.safetensors"),
     ["model.finetuned_pattern: has the field '{0}'"]),
    ("pattern-empty-field", ("model.finetuned_pattern", "/tmp/{}/{task}.safetensors"),
     ["model.finetuned_pattern: has the field '{}'"]),
    ("pattern-format-spec", ("model.finetuned_pattern", "/tmp/{task:>9}.safetensors"),
     ["model.finetuned_pattern: has the field '{task:>9}'"]),
    ("pattern-unmatched-brace", ("model.finetuned_pattern", "/tmp/{task}/{x.safetensors"),
     ["model.finetuned_pattern: expected '}' before end of string; the only field is '{task}' (write a literal "
      "brace as '{{' or '}}')", "(got '/tmp/{task}/{x.safetensors')"]),
    ("pattern-single-closing-brace", ("model.finetuned_pattern", "/tmp/{task}}.safetensors"),
     ["model.finetuned_pattern: Single '}' encountered"]),
    ("pattern-escaped-task-only", ("model.finetuned_pattern", "/tmp/{{task}}.safetensors"),
     ["model.finetuned_pattern: must contain '{task}'"]),
    ("finetuned-key-not-a-task", ("model.finetuned", {"toy_stripess": "/tmp/s.safetensors"}),
     ["model.finetuned.toy_stripess: neither one of the sweep's tasks (toy_stripes, toy_colours) nor a registered "
      "task; did you mean 'toy_stripes'?"]),
    ("heads-key-not-a-task", ("model.heads", {"toy_colour": "/tmp/h.safetensors"}),
     ["model.heads.toy_colour: neither one of the sweep's tasks (toy_stripes, toy_colours) nor a registered task; "
      "did you mean 'toy_colours'?"]),
    # task_vectors' dataset spelling, in a model block for all eight run on two tasks: the registered name is meant
    ("finetuned-key-dataset-title", ("model.finetuned", {"SUN397": "/tmp/s.safetensors"}),
     ["model.finetuned.SUN397: neither one of the sweep's tasks (toy_stripes, toy_colours) nor a registered task; "
      "did you mean 'sun397'?"]),
    ("pretrained-missing", ("model.pretrained", "/nonexistent/pretrained.safetensors"),
     ["model.pretrained: weights file does not exist", "(got '/nonexistent/pretrained.safetensors')"]),
    ("finetuned-missing", ("model.finetuned_pattern", "/nonexistent/{task}.safetensors"),
     ["model.finetuned_pattern: checkpoint of task 'toy_stripes' does not exist",
      "(got '/nonexistent/toy_stripes.safetensors')"]),
    ("finetuned-entry-missing", ("model.finetuned", {"toy_colours": "/nonexistent/c.safetensors"}),
     ["model.finetuned.toy_colours: checkpoint does not exist"]),
    ("head-missing", ("model.heads", {"toy_colours": "/nonexistent/h.safetensors"}),
     ["model.heads.toy_colours: head file does not exist"]),
    ("head-folder", ("model.heads", {"toy_colours": "/"}), ["model.heads.toy_colours: is a folder, not a head file"]),
    ("workers-zero", ("executor.workers", 0), ["executor.workers:", "(got 0)"]),
    ("executor-kind", ("executor.kind", "kubernetes"), ["executor.kind:", "'kubernetes'"]),
    ("name-pattern", ("name", "has space"), ["name:", "'has space'"]),
    ("threads-zero", ("threads", 0), ["threads:", "between 1 and 256"]),
    ("method-import-path", ("methods.0.name", "no_such_pkg.mod:Thing"),
     ["methods.0.name:", "cannot import module 'no_such_pkg.mod'"]),
    ("task-import-path", ("tasks", ["no_such_pkg.mod:make_task", "toy_colours"]),
     ["tasks.0:", "cannot import module 'no_such_pkg.mod'"]),
    ("task-entry-import-path", ("tasks", [{"name": "no_such_pkg.mod:make_task"}, "toy_colours"]),
     ["tasks.0.name:", "cannot import module 'no_such_pkg.mod'"]),
    ("task-import-attribute", ("tasks", ["tasks.synthetic:no_such_factory", "toy_colours"]),
     ["tasks.0: module 'tasks.synthetic' (", "synthetic.py) has no 'no_such_factory'"]),
    ("task-import-attribute-typo", ("tasks", ["tasks.synthetic:make_toy_tsk", "toy_colours"]),
     ["tasks.0: module 'tasks.synthetic' (", "has no 'make_toy_tsk'; did you mean 'make_toy_task'?"]),
    ("method-import-no-attribute", ("methods.0.name", "methods.task_arithmetic:"),
     ["methods.0.name: 'methods.task_arithmetic:' names no object: write module:Name"]),
    # a typo names the closest valid name (case aside); a name close to none gets no guess
    ("misspelt-required-key", ("task", ["toy_stripes"]), ["task: unknown key; did you mean 'tasks'?"]),
    ("misspelt-nested-key", ("eval.max_sample", 5), ["eval.max_sample: unknown key; did you mean 'max_samples'?"]),
    ("misspelt-key-in-list", ("methods.1.lable", "x"), ["methods.1.lable: unknown key; did you mean 'label'?"]),
    ("misspelt-space-key", ("methods.1", {"name": "task_arithmetic", "tune": {"space": {"scaling": {"typ": "float"}}}}),
     ["methods.1.tune.space.scaling.typ: unknown key; did you mean 'type'?"]),
    ("misspelt-method", ("methods.1.name", "task_arithmtic"),
     ["methods.1.name: unknown method 'task_arithmtic'; did you mean 'task_arithmetic'? (registered: adamerging,"]),
    ("misspelt-method-alone", ("methods", ["weight_averaging", "task_arithmtic"]),
     ["methods.1: unknown method 'task_arithmtic'; did you mean 'task_arithmetic'? (registered: adamerging,"]),
    ("task-not-a-factory", ("tasks", ["tasks.embedded:EMBEDDED_TASKS", "toy_colours"]),
     ["tasks.0: not a task factory (a callable returning a Task)"]),
    ("task-entry-not-a-factory", ("tasks", [{"name": "tasks.embedded:EMBEDDED_TASKS"}, "toy_colours"]),
     ["tasks.0.name: not a task factory (a callable returning a Task)"]),
    ("misspelt-task", ("tasks", ["toy_stripes", "toy_colour"]),
     ["tasks.1: unknown task 'toy_colour'; did you mean 'toy_colours'? (registered: "]),
    ("misspelt-hparam", ("methods.1.grid", {"scalng": [0.1]}),
     ["methods.1.grid.scalng: method 'task_arithmetic' has no hyperparameter 'scalng'; did you mean 'scaling'? "
      "(it has scaling)"]),
    ("misspelt-corruption", ("robustness", {"tasks": ["toy_stripes"], "corruptions": ["gausian_noise"]}),
     ["robustness.corruptions: unknown corruption 'gausian_noise'; did you mean 'gaussian_noise'?"]),
    ("misspelt-arch", ("model.arch", "harness-micro-vt"),
     ["model.arch: unknown open_clip architecture; did you mean 'harness-micro-vit'?", "(got 'harness-micro-vt')"]),
    ("arch-case", ("model.arch", "vit-b-32"), ["model.arch: unknown open_clip architecture; did you mean 'ViT-B-32'?"]),
    ("unknown-key-no-guess", ("zzzz", 1), ["zzzz: unknown key"]),
    ("grid-scalar", ("methods.1.grid.scaling", 0.3),
     ["methods.1.grid.scaling: a grid takes a list of values (write [0.3], or give it in params) (got 0.3)"]),
    ("method-entry-type", ("methods", [3]), ["methods.0: Input should be a name or a mapping (got 3)"]),
    ("block-type", ("eval", 3), ["eval: Input should be a mapping (got 3)"]),
    ("union-member-not-in-path", ("references.routing_bound_lambda", "many"),
     ["references.routing_bound_lambda: Input should be a valid number", "(got 'many')"]),
    ("threads-word", ("threads", "many"), ["threads: must be a number of threads between 1 and 256, or 'auto' (got 'many')"]),
    ("param-and-grid", ("methods.1.params", {"scaling": 0.3}), ["methods.1:", "given both in params and grid"]),
    ("grid-duplicate", ("methods.1.grid", {"scaling": [0.5, 0.2, "0.5"]}),
     ["methods.1.grid: settings {'scaling': 0.5} and {'scaling': '0.5'} are the same setting once validated"]),
    ("method-model-level", ("methods.0", {"name": "wemoe", "params": {"task_id_weight": 1.0}}),
     ["methods.0.params: task_id_weight > 0", "(got {'task_id_weight': 1.0})"]),
    ("duplicate-label", ("methods.0", {"name": "task_arithmetic"}), ["methods:", "labels not unique"]),
    ("duplicate-given-label", ("methods", [{"name": "task_arithmetic", "label": "x"},
                                           {"name": "weight_averaging", "label": "x"}]),
     ["methods: method labels not unique: ['x'] (give each entry a label of its own)"]),
    ("tasks-not-list", ("tasks", "toy_stripes"), ["tasks:", "valid list"]),
    ("model-source", ("model.source", "hub"), ["model.source:", "'hub'"]),
    ("task-options-type", ("tasks", [{"name": "toy_stripes", "options": 3}]), ["tasks.0.options:", "(got 3)"]),
    ("generalization-unknown-task", ("generalization", {"unseen": ["toy_colours", "nope_task"]}),
     ["generalization.unseen.1: not one of the sweep's tasks", "'nope_task'"]),
    ("space-entry-a-list", ("methods.1.tune", {"n_trials": 2, "space": {"scaling": [0.1, 1.0]}}),
     ["methods.1.tune.space.scaling: Input should be a mapping (got [0.1, 1.0])"]),
    ("misspelt-unseen-task", ("unseen", ["toy_colour"]),
     ["unseen.0: not one of the sweep's tasks; did you mean 'toy_colours'? (got 'toy_colour')"]),
    ("misspelt-robustness-task", ("robustness", {"tasks": ["toy_stripe"]}),
     ["robustness.tasks.0: not one of the sweep's tasks; did you mean 'toy_stripes'?"]),
    ("misspelt-generalization-task", ("generalization", {"unseen": ["toy_colour"]}),
     ["generalization.unseen.0: not one of the sweep's tasks; did you mean 'toy_colours'?"]),
    ("generalization-all-unseen", ("generalization", {"unseen": ["toy_stripes", "toy_colours"]}),
     ["generalization.unseen: every task is unseen: nothing to merge"]),
    ("generalization-empty", ("generalization", {}), ["generalization:", "give 'unseen' (or 'seen')"]),
    ("generalization-unseen-empty", ("generalization", {"unseen": []}), ["generalization.unseen:", "at least 1 item"]),
    ("generalization-unknown-key", ("generalization", {"unsean": ["toy_colours"]}),
     ["generalization.unsean: unknown key"]),
    ("generalization-overlap", ("generalization", {"seen": ["toy_stripes"], "unseen": ["toy_stripes"]}),
     ["generalization.unseen: tasks both seen and unseen: ['toy_stripes']"]),
    ("generalization-none-unseen", ("generalization", {"seen": ["toy_stripes", "toy_colours"]}),
     ["generalization.seen: no task is left unseen"]),
]


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("case_id,edit,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_exit_2(case_id, edit, fragments, sweep_dict, tmp_path):
    path, value = edit
    bad = _set(sweep_dict, path, value)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    assert code == 2, (out, err)
    message = " ".join(err.split())
    assert message.startswith(f"error: {f}:"), message
    for frag in fragments:
        assert frag in message, (frag, message)
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()  # nothing written


# Errors that need two edits: the block next to a whole-sweep split, or next to a tuned method.
GENERALIZATION_CLASHES = [
    ("top-level-unseen", {"unseen": ["toy_colours"]},
     ["generalization: cannot be combined with top-level 'unseen'"]),
    ("top-level-seen", {"seen": ["toy_stripes"]}, ["generalization: cannot be combined with top-level 'seen'"]),
    ("tuned-method", {"methods": [{"name": "task_arithmetic", "tune": {"n_trials": 2, "space": {
        "scaling": {"type": "float", "low": 0.1, "high": 0.9}}}}]},
     ["methods.0.tune: tuned methods cannot be combined with the 'generalization' block"]),
    ("reserved-label", {"methods": [{"name": "task_arithmetic", "label": "ta (gen)"}]},
     ["methods.0.label:", "reserved for the generalization block", "'ta (gen)'"]),
]


@pytest.mark.parametrize("case_id,extra,fragments", GENERALIZATION_CLASHES, ids=[c[0] for c in GENERALIZATION_CLASHES])
def test_generalization_block_clashes(case_id, extra, fragments, sweep_dict, tmp_path):
    bad = {**sweep_dict, "generalization": {"unseen": ["toy_colours"]}, **extra}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    message = " ".join(err.split())
    assert code == 2 and message.startswith(f"error: {f}:"), message
    for frag in fragments:
        assert frag in message, (frag, message)
    assert "Traceback" not in err + out


@pytest.mark.parametrize("overrides,blamed", [
    (["threads=3", "threads=two"], "threads=two"),
    (["eval.batch_size=4", "eval=3"], "eval=3"),
])
def test_a_field_given_twice_on_the_command_line_blames_the_override_in_effect(overrides, blamed, sweep_dict, tmp_path):
    """The later of two overrides of a field is the one in effect: its error names it, not the
    earlier, valid one."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["validate", str(f), *overrides])
    assert r.exit_code == 2 and f"error: <command line> ({blamed}, over {f}): " in " ".join(r.stderr.split()), r.output


def test_malformed_yaml(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: toy\ntasks: [toy_stripes\nmethods: {}\n")
    code, _, err = _run(["validate", str(f)])
    assert code == 2 and "malformed YAML: line" in err and str(f) in " ".join(err.split())


def test_a_sweep_file_not_in_utf8_is_one_line(tmp_path):
    """A Latin-1 comment (an editor's default) names the byte and where it lies, not a traceback."""
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: toy\n# r\u00e9sum\u00e9\ntasks: [toy_stripes]\n".encode("latin-1"))
    code, out, err = _run(["validate", str(f)])
    assert code == 2, (out, err)
    assert " ".join(err.split()) == (f"error: {f}: not UTF-8 text: byte 0xe9 at line 2, column 4; "
                                     "save the file as UTF-8")
    assert "Traceback" not in out + err


def test_top_level_not_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    code, _, err = _run(["sweep", str(f)])
    assert code == 2 and "top level must be a mapping" in err


@pytest.mark.parametrize("text", ["", "# a comment\n", "---\n"])
def test_an_empty_sweep_file_is_told_as_empty(text, tmp_path):
    """Not as 'top level must be a mapping (got None)': the file holds no value, None or other."""
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    code, _, err = _run(["validate", str(f)])
    assert code == 2 and " ".join(err.split()) == f"error: {f}: the file holds no fields (it is empty or only comments)"


@pytest.mark.parametrize("key", ["on", "No", "off"])
def test_a_key_yaml_reads_as_a_boolean_is_named_as_written(key, sweep_dict, tmp_path):
    """YAML 1.1 reads ``on:`` as true: the line said ``eval.1: Keys should be strings (got True)``,
    naming neither the key nor anything in the file; it is the unknown key it is, as written."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({k: v for k, v in sweep_dict.items() if k != "eval"}) + f"eval:\n  {key}: 3\n")
    code, _, err = _run(["validate", str(f)])
    assert code == 2 and " ".join(err.split()).startswith(f"error: {f}: eval.{key}: unknown key"), err


def test_missing_file(tmp_path):
    code, _, err = _run(["sweep", str(tmp_path / "nope.yaml")])
    assert code == 2 and "file does not exist" in err


@pytest.mark.parametrize("override,fragment", [
    ("seed", "override must look like key.path=value"),
    ("methods.7.name=x", "methods.7: no list item 7"),
    ("eval.batch_size=-5", "eval.batch_size:"),
    ("methods[1].grid.scaling=[0.1]", "methods[1].grid.scaling: list items are dotted indices: write "
     "methods.1.grid.scaling=[0.1]"),
    ("methods.1.grid.scaling=[0.1, -2]", "methods.1.grid.scaling:"),
])
def test_bad_override(override, fragment, sweep_dict, tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    code, _, err = _run(["validate", str(f), override])
    message = " ".join(err.split())
    assert code == 2 and fragment in message, err
    assert message.startswith(f"error: <command line> ({override}, over {f}): "), message  # the file itself is fine


@pytest.mark.parametrize("overrides,blamed,field", [
    (["methods.0.tune.n_trials=3"], "methods.0.tune.n_trials=3", "methods.0.tune.space"),
    (["methods.1.tune.space.scaling.low=0.1", "methods.1.tune.space.scaling.high=0.5"],
     "methods.1.tune.space.scaling.high=0.5", "methods.1.tune.space.scaling.type"),
])
def test_a_field_missing_from_a_mapping_an_override_made_names_the_override(overrides, blamed, field, sweep_dict,
                                                                             tmp_path):
    """An override into a block the file lacks (a ``tune`` of its own) makes that block; what it
    then lacks is the command line's mistake, not the file's, which has no such block."""
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    code, _, err = _run(["validate", str(f), *overrides])
    assert code == 2
    assert " ".join(err.split()) == f"error: <command line> ({blamed}, over {f}): {field}: required field is missing"
    from harness.config import load_config
    from harness.config_errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(f, overrides)
    assert exc.value.file == f"<command line> ({blamed}, over {f})"


@pytest.mark.parametrize("in_file,overrides,blamed,line", [
    ({"unseen": ["toy_colours"]}, ["seen=[toy_stripes, toy_colours]"], "seen=[toy_stripes, toy_colours]",
     "seen: tasks both seen and unseen: ['toy_colours']"),
    ({"seen": ["toy_stripes", "toy_colours"]}, ["unseen=[toy_colours]"], "unseen=[toy_colours]",
     "unseen: tasks both seen and unseen: ['toy_colours']"),
    ({"generalization": {"unseen": ["toy_colours"]}}, ["generalization.seen=[toy_stripes, toy_colours]"],
     "generalization.seen=[toy_stripes, toy_colours]", "generalization.seen: tasks both seen and unseen: "
                                                       "['toy_colours']"),
    ({"tasks": ["toy_stripes", "toy_colours", "toy_checks"], "seen": ["toy_stripes"]}, ["unseen=[toy_colours]"],
     "unseen=[toy_colours]", "unseen: tasks neither seen nor unseen: ['toy_checks']"),
    ({"seen": ["toy_stripes", "toy_colours"], "unseen": ["toy_colours"]}, ["eval.max_samples=5"], None,
     "unseen: tasks both seen and unseen: ['toy_colours']"),
    ({}, ["seen=[]"], "seen=[]", "seen: every task is unseen: nothing to merge (got [])"),
])
def test_a_split_an_override_made_wrong_names_the_override(in_file, overrides, blamed, line, sweep_dict, tmp_path):
    """A task both seen and unseen (or neither) is as much the fault of the one field as of the
    other: where either came from the command line, the error says so and names that field; the
    file is blamed only when it gives both."""
    f = tmp_path / "split.yaml"
    f.write_text(yaml.safe_dump({**sweep_dict, **in_file}))
    where = f"<command line> ({blamed}, over {f})" if blamed else str(f)
    code, _, err = _run(["validate", str(f), *overrides])
    assert code == 2 and " ".join(err.split()) == f"error: {where}: {line}", err


def test_override_of_an_unknown_key_names_the_override(sweep_dict, tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    code, _, err = _run(["validate", str(f), "evall.batch_size=4"])
    assert code == 2
    assert " ".join(err.split()) == (f"error: <command line> (evall.batch_size=4, over {f}): evall: unknown key; "
                                     "did you mean 'eval'?")


def test_missing_checkpoint_is_one_line(sweep_dict, tmp_path):
    bad = _set(sweep_dict, "model.finetuned_pattern", str(tmp_path / "none" / "{task}.safetensors"))
    f = tmp_path / "ck.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["sweep", "-q", str(f)])
    assert code == 2, out + err
    assert " ".join(err.split()).startswith(
        f"error: {f}: model.finetuned_pattern: checkpoint of task 'toy_stripes' does not exist")
    assert "Traceback" not in err


def test_overrides_apply_and_env_expands(sweep_dict, tmp_path, monkeypatch):
    from harness.config import load_config

    monkeypatch.setenv("HARNESS_TEST_ROOT", str(tmp_path))
    d = _set(sweep_dict, "output_dir", "${HARNESS_TEST_ROOT}/runs")
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(d))
    cfg = load_config(f, ["methods.1.grid.scaling=[0.1, 0.9]", "seed=4", "eval.max_samples = 10"])
    assert cfg.methods[1].grid["scaling"] == [0.1, 0.9]
    assert cfg.seed == 4 and cfg.eval.max_samples == 10
    assert cfg.output_dir == f"{tmp_path}/runs"


def test_env_expands_in_a_task_data_root(sweep_dict, tmp_path, monkeypatch):
    """A task's own data folder (``options.data_root``) is a path like the top-level one: ``${VAR}``
    expands in it, and an unset variable is an error naming that field and its value, as for any other
    field (not the options, without the value)."""
    monkeypatch.setenv("HARNESS_TEST_ROOT", str(tmp_path))
    (tmp_path / "dtd").mkdir()
    d = _set(sweep_dict, "tasks", [*sweep_dict["tasks"], {"name": "dtd", "options": {"data_root": "${HARNESS_TEST_ROOT}/dtd"}}])
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(d))
    from harness.config import load_config

    assert load_config(f).tasks[-1].options["data_root"] == f"{tmp_path}/dtd"
    d["tasks"][-1]["options"]["data_root"] = "${HARNESS_TEST_UNSET_VAR}/dtd"
    f.write_text(yaml.safe_dump(d))
    code, _, err = _run(["validate", str(f)])
    assert code == 2, err
    field = f"tasks.{len(d['tasks']) - 1}.options.data_root"
    assert " ".join(err.split()) == (f"error: {f}: {field}: environment variable HARNESS_TEST_UNSET_VAR is not set "
                                     "(got '${HARNESS_TEST_UNSET_VAR}/dtd')")


def test_env_expands_in_a_study_storage(sweep_dict, tmp_path, monkeypatch):
    """``tune.storage`` is a path (a journal's) or a URL as ``tracking_uri`` is: ``${VAR}`` expands
    in it (a journal was made under a folder named ``${VAR}`` in the working folder), and an unset
    variable is an error naming that field."""
    from harness.config import load_config

    monkeypatch.setenv("HARNESS_TEST_ROOT", str(tmp_path))
    d = _set(sweep_dict, "methods.1", {"name": "task_arithmetic", "tune": {
        "n_trials": 2, "space": {"scaling": {"type": "float", "low": 0.1, "high": 0.9}},
        "storage": "journal:${HARNESS_TEST_ROOT}/studies/journal.log"}})
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(d))
    assert load_config(f).methods[1].tune.storage == f"journal:{tmp_path}/studies/journal.log"
    d["methods"][1]["tune"]["storage"] = "sqlite:///${HARNESS_TEST_UNSET_VAR}/studies.db"
    f.write_text(yaml.safe_dump(d))
    code, _, err = _run(["validate", str(f)])
    assert code == 2, err
    assert " ".join(err.split()) == (f"error: {f}: methods.1.tune.storage: environment variable "
                                     "HARNESS_TEST_UNSET_VAR is not set (got 'sqlite:///${HARNESS_TEST_UNSET_VAR}"
                                     "/studies.db')")


def test_an_unset_variable_in_a_per_task_model_file_names_its_task_and_value(sweep_dict, tmp_path):
    """``model.finetuned`` and ``model.heads`` values: an unset ``${VAR}`` was told at the whole
    mapping, without the value and for the first alone; each is told at its task's key."""
    d = copy.deepcopy(sweep_dict)
    d["model"]["finetuned"] = {"toy_stripes": "${HARNESS_TEST_UNSET_VAR}/a.safetensors"}
    d["model"]["heads"] = {"toy_colours": "${HARNESS_TEST_UNSET_VAR2}/b.pt"}
    f = tmp_path / "env.yaml"
    f.write_text(yaml.safe_dump(d))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    assert err.splitlines() == [
        f"error: {f}: model.finetuned.toy_stripes: environment variable HARNESS_TEST_UNSET_VAR is not set "
        "(got '${HARNESS_TEST_UNSET_VAR}/a.safetensors')",
        f"{f}: model.heads.toy_colours: environment variable HARNESS_TEST_UNSET_VAR2 is not set "
        "(got '${HARNESS_TEST_UNSET_VAR2}/b.pt')",
    ]


@pytest.mark.parametrize("suite,tasks,fragments", [
    ({"finetune_stepz": 3}, ["emb_mnist"], ["model.suite.finetune_stepz: unknown key; did you mean 'finetune_steps'?"]),
    ({"arch": "harness-tiny-vt"}, ["emb_mnist"],
     ["model.suite.arch: unknown open_clip architecture; did you mean 'harness-tiny-vit'?"]),
    ({}, ["emb_mnist", "emb_sign"], ["tasks.1: unknown task 'emb_sign'; did you mean 'emb_signs'?"]),
    ({"finetune_lr": -1}, ["emb_mnist"], ["model.suite.finetune_lr:", "(got -1)"]),
    ({"size": "huge"}, ["emb_mnist"], ["model.suite.size:", "'huge'"]),
    ({}, ["emb_mnist", "toy_stripes"], ["tasks.1:", "has no fine-tuned model", "'toy_stripes'"]),
    ({"arch": "ViT-B-32"}, ["emb_mnist"],
     ["model.suite.arch:", "takes 224x224 images", "the embedded tasks' are 32x32", "(got 'ViT-B-32')"]),
    ({"arch": "RN50"}, ["emb_mnist"], ["model.suite.arch:", "takes 224x224 images", "(got 'RN50')"]),
    ({"arch": "harness-micro-vit"}, ["emb_mnist"], ["model.suite.arch:", "takes 16x16 images"]),
    ({"arch": "hf-vit-w128-l4-p8-i32-t128-l2"}, ["emb_mnist"],
     ["model.suite.arch:", "no config to pretrain from", "(got 'hf-vit-w128-l4-p8-i32-t128-l2')"]),
])
def test_embedded_suite_errors(suite, tasks, fragments, tmp_path):
    f = tmp_path / "emb.yaml"
    f.write_text(yaml.safe_dump({"name": "e", "model": {"source": "embedded", "suite": suite}, "tasks": tasks}))
    code, _, err = _run(["validate", str(f)])
    message = " ".join(err.split())
    assert code == 2, message
    for frag in fragments:
        assert frag in message, (frag, message)


@pytest.mark.parametrize("model,fragments", [
    ({"source": "embedded", "pretrained": "/nope.safetensors", "finetuned_pattern": "/nope/{task}.safetensors"},
     ["model:", "pretrained, finetuned_pattern given with source 'embedded'", "set source: files"]),
    ({"source": "embedded", "arch": "ViT-B-32"}, ["model:", "arch given with source 'embedded'", "model.suite.arch"]),
    ({"source": "files", "pretrained": "p.safetensors", "finetuned_pattern": "{task}.safetensors",
      "suite": {"pretrain_steps": 10}}, ["model:", "'suite' options configure source 'embedded' only"]),
])
def test_options_of_the_other_model_source_are_refused(model, fragments, tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump({"name": "m", "model": model, "tasks": ["emb_mnist"]}))
    code, _, err = _run(["validate", str(f)])
    message = " ".join(err.split())
    assert code == 2, message
    for frag in fragments:
        assert frag in message, (frag, message)


def test_embedded_source_accepts_its_default_arch_spelled_out(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump({"name": "m", "model": {"source": "embedded", "arch": "harness-tiny-vit"},
                                 "tasks": ["emb_mnist"]}))
    code, out, err = _run(["validate", str(f)])
    assert code == 0, err


def test_key_given_twice_is_refused_with_its_line(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("name: dup\ntasks: [emb_mnist]\nmethods:\n  - name: task_arithmetic\n"
                 "    params: {scaling: 0.3, scaling: 0.5}\n")
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    assert " ".join(err.split()) == f"error: {f}: malformed YAML: line 5, column 28: key 'scaling' given twice"


def test_a_merge_key_given_twice_is_refused_with_its_line(tmp_path):
    """Two ``<<`` keys merged both, the later one first (a weight_averaging entry with task
    arithmetic's params), unlike ``<<: [*a, *b]``; plain YAML would not say which wins."""
    f = tmp_path / "dup.yaml"
    f.write_text("name: dup\ntasks: [emb_mnist]\nmethods:\n  - &a {name: task_arithmetic}\n"
                 "  - &b {name: ties}\n  - <<: *a\n    <<: *b\n    label: both\n")
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    assert " ".join(err.split()) == (f"error: {f}: malformed YAML: line 7, column 5: key '<<' given twice "
                                     "(merge several mappings with <<: [*a, *b])")


def test_key_given_twice_in_an_override_value_is_refused(sweep_dict, tmp_path):
    """An override's value is YAML as the file is: a key given twice in its mapping was kept the
    last silently (a grid of 0.9 alone ran); it is refused naming the override."""
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    override = "methods.1.grid={scaling: [0.1], scaling: [0.9]}"
    code, _, err = _run(["validate", str(f), override])
    assert code == 2
    assert " ".join(err.split()) == (f"error: <command line> ({override}, over {f}): methods.1.grid: malformed "
                                     "YAML: key 'scaling' given twice (got '{scaling: [0.1], scaling: [0.9]}')")


def test_an_unclosed_list_in_an_override_is_malformed_yaml_not_a_string(sweep_dict, tmp_path):
    """``[0.1, 0.5`` was taken as the string '[0.1, 0.5', and the grid's line then advised writing
    ``['[0.1, 0.5']``; the override is refused as malformed YAML, while a value YAML cannot read
    that is no list (a pattern starting with '{task}') is still the string written."""
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    override = "methods.1.grid.scaling=[0.1, 0.5"
    code, _, err = _run(["validate", str(f), override])
    assert code == 2
    assert " ".join(err.split()) == (f"error: <command line> ({override}, over {f}): methods.1.grid.scaling: "
                                     "malformed YAML list: expected ',' or ']', but got '<stream end>' "
                                     "(got '[0.1, 0.5')")
    from harness.sweep_file import parse_override

    assert parse_override("model.finetuned_pattern={task}/encoder.pt")[1] == "{task}/encoder.pt"


def test_every_unknown_corruption_is_named_at_once(sweep_dict, tmp_path):
    """Two misspelt corruptions: the second was told only once the first was fixed."""
    d = copy.deepcopy(sweep_dict)
    d["robustness"] = {"tasks": ["toy_stripes"], "corruptions": ["contrast", "gausian_noise", "fgo"]}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(d))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    assert " ".join(err.split()).startswith(
        f"error: {f}: robustness.corruptions: unknown corruption 'gausian_noise'; did you mean 'gaussian_noise'?; "
        "unknown corruption 'fgo'; did you mean 'fog'? (known: "), err


def test_merge_keys_may_be_overridden(tmp_path):
    from harness.sweep_file import read_yaml

    f = tmp_path / "merge.yaml"
    f.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_yaml(f)["other"] == {"x": 3, "y": 2}


def test_booleans_are_never_numbers_but_other_lax_conversions_stay():
    """``steps: true`` would otherwise run one step; ``lr: 1e-3`` (a string to YAML 1.1) and a
    boolean hyperparameter given as a boolean must still work."""
    from pydantic import ValidationError

    from methods.base import resolve_method

    wemoe = resolve_method("wemoe")
    for name in ("steps", "lr", "router_depth"):  # int, float, and a Literal of ints
        with pytest.raises(ValidationError, match="expects a number, not the boolean true"):
            wemoe(**{name: True})
    m = wemoe(lr="1e-3", batch_reduce=True, steps=3)
    assert (m.lr, m.batch_reduce, m.steps) == (1e-3, True, 3)
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # why the string conversion must stay


def test_a_bad_item_of_a_list_hyperparameter_is_named_by_its_place(sweep_dict, tmp_path, monkeypatch):
    """A list hyperparameter with one bad item was named at the list (``methods.0.params.weights``);
    the item's place is named now, a grid value's position first, then the item's."""
    (tmp_path / "list_method.py").write_text(
        "from methods import MergeMethod\n\n\n"
        "class Weighted(MergeMethod):\n"
        "    weights: list[float] = [0.5, 0.5]\n\n"
        "    def merge(self, pretrained, finetuned, ctx):\n"
        "        return pretrained\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = _set(sweep_dict, "methods", [{"name": "list_method:Weighted", "params": {"weights": [0.5, "x"]}},
                                       {"name": "list_method:Weighted", "label": "grid",
                                        "grid": {"weights": [[0.5, 0.5], [0.2, "y"]]}}])
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and err.splitlines() == [
        f"error: {f}: methods.0.params.weights.1: Input should be a valid number, unable to parse string as a "
        "number (got 'x')",
        f"{f}: methods.1.grid.weights.1.1: Input should be a valid number, unable to parse string as a number "
        "(got 'y')"], err


@pytest.mark.parametrize("module,source,fragment", [
    ("bad_syntax", "def f(:\n", "importing module 'bad_syntax' failed at"),
    ("raises_on_import", "raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ("registers_twice", "from methods import register_method, MergeMethod\n\n\n@register_method('ties')\n"
                        "class Mine(MergeMethod):\n    pass\n", "method name 'ties' is already registered"),
    ("needs_dependency", "import torch\nimport no_such_dependency\n",
     "importing module 'needs_dependency' failed at {dir}/needs_dependency.py:2: ModuleNotFoundError: "
     "No module named 'no_such_dependency'"),
    ("raises_on_line_3", "import torch\n\nraise ValueError('bad default')\n",
     "importing module 'raises_on_line_3' failed at {dir}/raises_on_line_3.py:3: ValueError: bad default"),
])
@pytest.mark.parametrize("field", ["methods.0.name", "tasks.0"])
def test_a_broken_user_module_is_one_line(module, source, fragment, field, sweep_dict, tmp_path, monkeypatch):
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    if field.startswith("tasks"):
        bad = _set(sweep_dict, "tasks", [f"{module}:make", "toy_colours"])
    else:
        bad = _set(sweep_dict, field, f"{module}:Mine")
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    message = " ".join(err.split())
    fragment = fragment.format(dir=tmp_path)
    assert code == 2 and message.startswith(f"error: {f}: {field}:") and fragment in message, (out, err)
    assert "Traceback" not in err + out


def test_pattern_with_escaped_braces_and_checkpoints_of_unseen_tasks_are_accepted(sweep_dict, micro_checkpoints,
                                                                                  tmp_path):
    """Literal braces written as '{{' '}}' stay in the path; a fine-tuned checkpoint or head named for a
    task that is only evaluated (unseen, generalization, robustness) is a key of the sweep's tasks."""
    from harness.config import validate_config
    from harness.model_checks import check_model_files
    from harness.models import save_state_dict

    folder = tmp_path / "ckpt{v2}"
    folder.mkdir()
    for t in ("toy_stripes", "toy_colours"):
        (folder / f"{t}.safetensors").write_bytes((micro_checkpoints / f"{t}.safetensors").read_bytes())
    head = tmp_path / "head.safetensors"
    save_state_dict({"weight": torch.zeros(4, 32)}, head)
    d = copy.deepcopy(sweep_dict)
    d["model"]["finetuned_pattern"] = str(tmp_path / "ckpt{{v2}}" / "{task}.safetensors")
    d["model"]["finetuned"] = {"toy_colours": str(folder / "toy_colours.safetensors")}
    d["model"]["heads"] = {"toy_colours": str(head)}
    for split in ({"unseen": ["toy_colours"]}, {"generalization": {"unseen": ["toy_colours"]}}):
        cfg = validate_config({**d, **split})
        check_model_files(cfg, "<test>")
        assert cfg.model.finetuned_pattern.format(task="toy_stripes") == str(folder / "toy_stripes.safetensors")


def test_checkpoints_of_registered_tasks_outside_the_sweep_wait_for_a_sweep_with_them(sweep_dict, tmp_path):
    """One model block naming all eight tasks' checkpoints and heads serves a sweep of a few
    (``tasks=[...]`` on the command line, as the paper's robustness study merges four): the other
    entries are left unread, and the jobs' keys are those of a sweep without them."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    plain = copy.deepcopy(sweep_dict)
    d = copy.deepcopy(sweep_dict)
    d["model"]["finetuned"] = {"mnist": "/nonexistent/mnist.safetensors"}
    d["model"]["heads"] = {"mnist": "/nonexistent/head_mnist.safetensors", "cars": "/nonexistent/head_cars.pt"}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 0, r.output
    keep = {**d["model"], "heads": {"toy_colours": "/nonexistent/head_toy_colours.safetensors"}}
    f.write_text(yaml.safe_dump({**d, "model": keep}))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2 and "model.heads.toy_colours: head file does not exist" in r.output, r.output
    assert Workspace(validate_config(d)).identity == Workspace(validate_config(plain)).identity


@pytest.mark.parametrize("label", ["TA | 50% & #1", "unl_$x$", "../up", "it's", "a/b", "_x", "", "ta ", "x y "])
def test_a_label_that_would_break_metrics_files_or_tables_is_refused(label, sweep_dict, tmp_path):
    """A space at the end too: ``ta`` and ``ta `` would be two rows that read the same."""
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_set(sweep_dict, "methods.0.label", label)))
    code, out, err = _run(["validate", str(f)])
    assert code == 2, (out, err)
    assert " ".join(err.split()) == (f"error: {f}: methods.0.label: must start with a letter or digit, end with no "
                                     f"space and hold only letters, digits, spaces and _ . : ( ) + = , - "
                                     f"(got {label!r})")


@pytest.mark.parametrize("label", ["t", "7", "TA (0.3)", "ties k=20, lam=1.5", "a b-c.d:e+f"])
def test_a_label_of_the_characters_it_may_hold_is_taken(label, sweep_dict):
    from harness.config import validate_config

    assert validate_config(_set(sweep_dict, "methods.0.label", label)).methods[0].display == label


def test_methods_by_name_alone(sweep_dict):
    """``methods: [weight_averaging, task_arithmetic]`` is the short form of ``- name:`` entries."""
    from harness.config import validate_config

    from harness.sweep_file import apply_overrides

    short = validate_config(dict(sweep_dict, methods=["weight_averaging", "task_arithmetic"]))
    long = validate_config(dict(sweep_dict, methods=[{"name": "weight_averaging"}, {"name": "task_arithmetic"}]))
    assert short.model_dump() == long.model_dump()
    raw = apply_overrides(dict(sweep_dict, methods=["weight_averaging", "task_arithmetic"]),
                          ["methods.1.params.scaling=0.7"])  # a field of a short entry
    assert raw["methods"] == ["weight_averaging", {"name": "task_arithmetic", "params": {"scaling": 0.7}}]


def test_misspelt_required_key_is_named_not_reported_missing(sweep_dict, tmp_path):
    """``task:`` for ``tasks:`` is both an unknown key and a missing field: the typo is the news."""
    bad = dict(sweep_dict)
    bad["task"] = bad.pop("tasks")
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    assert " ".join(err.split()) == f"error: {f}: task: unknown key; did you mean 'tasks'?"


def test_relative_model_path_says_where_it_is_read_from(sweep_dict, tmp_path, monkeypatch):
    """A relative checkpoint path is read from the current folder, not the sweep file's: run from
    elsewhere, the error says which folder it looked in."""
    (tmp_path / "sweep").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    d = _set(sweep_dict, "model.pretrained", "ckpt/pretrained.safetensors")
    f = tmp_path / "sweep" / "rel.yaml"
    f.write_text(yaml.safe_dump(d))
    monkeypatch.chdir(elsewhere)
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    assert " ".join(err.split()) == (
        f"error: {f}: model.pretrained: weights file does not exist (relative paths are read from the current "
        f"folder, {elsewhere}) (got 'ckpt/pretrained.safetensors')")


def test_generated_arch_names_are_left_to_the_checkpoints(sweep_dict, tmp_path):
    """``hf-vit-...`` architectures are recorded beside converted files, not in a config folder:
    validation leaves them to the run, which reads them from there."""
    from harness.models import unknown_arch_problem

    assert unknown_arch_problem("hf-vit-w768-l12-p32-i224-quickgelu-0123abcd") is None
    assert unknown_arch_problem("ViT-B-32-quickgelu") is None
    assert unknown_arch_problem("harness-micro-vit") is None
    assert "did you mean 'ViT-L-14'?" in unknown_arch_problem("ViT-L14")


def test_an_architecture_defined_beside_the_weights_validates(sweep_dict, tmp_path):
    """An architecture in ``model_configs/<arch>.json`` next to ``model.pretrained`` is built from
    there when the sweep runs, so validation accepts it; the same name without it is refused."""
    import shutil

    from harness.models import CONFIG_DIR

    weights = tmp_path / "ckpt" / "pretrained.safetensors"
    weights.parent.mkdir()
    shutil.copy(sweep_dict["model"]["pretrained"], weights)
    sweep = {**sweep_dict, "model": {**sweep_dict["model"], "arch": "lab-micro-vit", "pretrained": str(weights)}}
    f = tmp_path / "lab.yaml"
    f.write_text(yaml.safe_dump(sweep))
    code, _, err = _run(["validate", str(f)])
    assert code == 2 and "model.arch: unknown open_clip architecture" in " ".join(err.split()), err
    (weights.parent / "model_configs").mkdir()
    shutil.copy(CONFIG_DIR / "harness-micro-vit.json", weights.parent / "model_configs" / "lab-micro-vit.json")
    code, out, err = _run(["validate", str(f)])
    assert code == 0, err
    assert "valid" in out


@pytest.mark.parametrize("task,top,fragment", [
    ({"name": "dtd", "options": {"data_root": "/nonexistent/data"}}, None,
     "tasks.2.options.data_root: data folder of task 'dtd' does not exist (got '/nonexistent/data')"),
    ("dtd", "/nonexistent/top", "data_root: data folder of task 'dtd' does not exist (got '/nonexistent/top')"),
    ("dtd", None, "data_root: task 'dtd' reads its images from a data folder: set data_root (or "
                  "tasks.2.options.data_root)"),
    ({"name": "dtd", "options": {"data_root": "FILE"}}, None,
     "tasks.2.options.data_root: data folder of task 'dtd' is a file, not a folder"),
], ids=["option-missing", "top-level-missing", "unset", "a-file"])
def test_a_missing_data_folder_is_reported_by_validate(task, top, fragment, sweep_dict, tmp_path):
    """Tasks read from a data folder (the real datasets) are refused before any job runs, naming
    the file, the field and the folder; the sweep's other tasks (generated) need none."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    if isinstance(task, dict) and task["options"]["data_root"] == "FILE":
        task = {"name": "dtd", "options": {"data_root": str(a_file)}}
    d = dict(sweep_dict, tasks=[*sweep_dict["tasks"], task], unseen=["dtd"])
    if top is not None:
        d["data_root"] = top
    f = tmp_path / "data.yaml"
    f.write_text(yaml.safe_dump(d))
    for args in (["validate", str(f)], ["sweep", "--dry-run", str(f)]):
        code, out, err = _run(args)
        assert code == 2, (out, err)
        assert " ".join(err.split()).startswith(f"error: {f}: {fragment}"), err
    (tmp_path / "data").mkdir()
    d = dict(d, data_root=str(tmp_path / "data"))
    if isinstance(task, dict):
        d["tasks"] = [*sweep_dict["tasks"], {"name": "dtd", "options": {"data_root": str(tmp_path / "data")}}]
    f.write_text(yaml.safe_dump(d))
    field = "tasks.2.options.data_root" if isinstance(task, dict) else "data_root"
    for args in (["validate", str(f)], ["sweep", "--dry-run", str(f)]):  # a folder without the dataset
        code, out, err = _run(args)
        assert code == 2, (out, err)
        assert " ".join(err.split()).startswith(f"error: {f}: {field}: task 'dtd': no data under {tmp_path / 'data'};")
    from tests.test_vision8 import write_imagefolder

    write_imagefolder(tmp_path / "data", "dtd")
    code, out, err = _run(["validate", str(f)])
    assert code == 0, (out, err)


def test_validate_finds_each_dataset_in_its_folder(sweep_dict, tmp_path):
    """validate looks inside the data folder as the run would: a half-copied dataset (no test
    split, a class folder missing) or an option the task does not take is one line naming the
    field, not the sweep's first error after validate said valid."""
    from tests.test_vision8 import folder_names, write_imagefolder

    write_imagefolder(tmp_path / "data", "dtd", test_dir="elsewhere")
    d = dict(sweep_dict, tasks=[*sweep_dict["tasks"], "dtd"], unseen=["dtd"], data_root=str(tmp_path / "data"))
    f = tmp_path / "data.yaml"
    f.write_text(yaml.safe_dump(d))
    code, out, err = _run(["validate", str(f)])
    train = tmp_path / "data" / "dtd" / "train"
    assert code == 2 and " ".join(err.split()).startswith(
        f"error: {f}: data_root: task 'dtd': found {train} but neither {train.parent / 'test'} nor "
        f"{train.parent / 'val'}"), (out, err)
    shutil.rmtree(tmp_path / "data")
    write_imagefolder(tmp_path / "data", "dtd", folders=folder_names("dtd")[:-1])
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and f"error: {f}: data_root: task 'dtd': " in " ".join(err.split()), (out, err)
    assert "46" in err and "47" in err, err
    d["tasks"][-1] = {"name": "dtd", "options": {"bogus": 1}}
    f.write_text(yaml.safe_dump(d))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and " ".join(err.split()).startswith(
        f"error: {f}: tasks.2.options: bad options for task 'dtd': "), (out, err)


def test_a_relative_data_folder_says_where_it_is_read_from(sweep_dict, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "data.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, tasks=[*sweep_dict["tasks"], "dtd"], unseen=["dtd"], data_root="data")))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and f"(relative paths are read from the current folder, {tmp_path})" in " ".join(err.split())


def test_a_task_whose_data_folder_is_optional_validates_without_one(sweep_dict, tmp_path, monkeypatch):
    """A task of one's own whose factory has a default for ``data_root`` is built without one (as
    the run builds it): validate does not ask for a data folder it does not need."""
    (tmp_path / "optional_root.py").write_text(
        "from tasks.base import resolve_task\n\n\n"
        "def stripes(data_root=None):\n    return resolve_task('toy_stripes')()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "data.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, tasks=[*sweep_dict["tasks"], "optional_root:stripes"],
                                     unseen=["optional_root:stripes"])))
    code, out, err = _run(["validate", str(f)])
    assert code == 0, (out, err)
    f.write_text(yaml.safe_dump(dict(sweep_dict, tasks=[*sweep_dict["tasks"], "optional_root:stripes"],
                                     unseen=["optional_root:stripes"], data_root=str(tmp_path / "nowhere"))))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and " ".join(err.split()).startswith(
        f"error: {f}: data_root: data folder of task 'optional_root:stripes' does not exist"), err


@pytest.mark.parametrize("typo, candidates, meant", [
    ("daer", ["dare", "ties", "task_arithmetic"], "dare"),  # two letters swapped
    ("hgih", ["low", "high", "step", "log", "type", "choices"], "high"),
    ("lwo", ["low", "high", "step"], "low"),
    ("tise", ["dare", "ties"], "ties"),
    ("Wemeo", ["wemoe", "ties"], "wemoe"),  # case aside
    ("xyz", ["low", "high", "step"], None),
    ("hi", ["ho", "high"], None),  # too short to tell a slip from another word
    ("wol", ["low"], None),  # two letters swapped, but not adjacent ones
    ("abz", ["xaz"], None),  # two letters changed: 'a' moved, 'x' new
    ("Tiess", ["Ties", "dare"], "Ties"),  # the name as the candidates spell it
])
def test_a_slip_of_two_swapped_letters_gets_a_did_you_mean(typo, candidates, meant):
    from harness.errors import did_you_mean

    assert did_you_mean(typo, candidates) == (f"; did you mean {meant!r}?" if meant else "")


def test_a_tracking_uri_that_is_a_files_path_is_bad_input(sweep_dict, tmp_path):
    """``tracking_uri: .../mlflow.db`` (no ``sqlite:///``): MLflow takes a path for a folder store and
    failed mid-sweep, at its first write; it is refused up front, with the URI that was meant."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, tracking_uri=str(db))))
    for args in (["validate", str(f)], ["sweep", str(f)]):
        code, out, err = _run(args)
        assert code == 2, (out, err)
        assert " ".join(err.split()) == (f"error: {f}: tracking_uri: is a file, not an MLflow store; a SQLite "
                                         f"database is given as sqlite:///{db} (got '{db}')")
    assert not (tmp_path / "out").exists()
    f.write_text(yaml.safe_dump(dict(sweep_dict, tracking_uri=f"sqlite:///{db}")))
    assert _run(["validate", str(f)])[0] == 0


def test_a_sqlite_tracking_uri_under_a_file_is_bad_input_before_any_job(sweep_dict, tmp_path):
    """``tracking_uri: sqlite:///<file>/mlflow.db``: its folder cannot be made, as a file stands at
    it. ``validate`` passed it, and a sweep ran its first jobs, then crashed in MLflow's store
    seeding with a FileExistsError traceback; both now refuse it in one line naming the field."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("")
    uri = f"sqlite:///{blocker}/runs/mlflow.db"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, tracking_uri=uri)))
    for args in (["validate", str(f)], ["sweep", str(f)]):
        code, out, err = _run(args)
        assert code == 2, (out, err)
        assert " ".join(err.split()) == f"error: {f}: tracking_uri: {blocker} is a file, not a folder (got '{uri}')"
    assert not (tmp_path / "out").exists()  # no job ran


def test_a_damaged_mlflow_store_in_the_output_folder_is_named_before_any_job(sweep_dict, tmp_path):
    """``<output_dir>/mlflow.db`` that is no database (overwritten, damaged): the sweep ran its first
    jobs and then crashed in MLflow with a traceback; it now stops first, naming the file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mlflow.db").write_text("not a database\n" * 100)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    for args in (["validate", str(f)], ["sweep", str(f)]):
        code, out_text, err = _run(args)
        assert code == 2, (out_text, err)
        assert " ".join(err.split()) == (f"error: {f}: output_dir: its MLflow store {out / 'mlflow.db'} is not an "
                                         "SQLite database (file is not a database); move it aside, and the next "
                                         "sweep starts a new store")
    assert sorted(p.name for p in out.iterdir()) == ["mlflow.db"]  # no job ran


@pytest.mark.parametrize("command", [["validate"], ["sweep"], ["sweep", "--dry-run"], ["list", "methods", "--sweep"]])
def test_a_folder_given_as_the_sweep_file_is_one_line_naming_its_sweeps(command, tmp_path):
    """``harness sweep sweeps/`` (completion stopped at the folder): one line, as for a missing file,
    naming the sweep files it holds, instead of click's usage block."""
    (tmp_path / "b.yaml").write_text("name: b\n")
    (tmp_path / "a.yml").write_text("name: a\n")
    (tmp_path / "notes.txt").write_text("")
    code, out, err = _run([*command, str(tmp_path)])
    assert code == 2, (out, err)
    assert err == f"error: {tmp_path}: is a folder, not a sweep file (it holds a.yml, b.yaml)\n"


def test_only_fields_taking_numbers_and_no_booleans_refuse_a_boolean():
    """A boolean is refused where only numbers are taken (int, float, optional ones, a Literal of
    numbers, a number-or-string union) and kept where a boolean is a valid value (bool, a union
    with bool, a Literal of booleans) or no number is taken (str)."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ValidationError, field_validator

    from harness.fields import no_bool_for_number

    refusing = {"i": int, "f": float, "opt": Optional[int], "pipe": float | None, "lit": Literal[1, 2],
                "num_or_text": Union[float, str]}
    keeping = {"b": bool, "int_or_bool": Union[int, bool], "lit_bool": Literal[False, True], "text": str,
               "mixed_lit": Literal[0, True]}

    for name, ann in {**refusing, **keeping}.items():
        model = type("M", (BaseModel,), {"__annotations__": {name: ann},
                                         "_check": field_validator("*", mode="before")(
                                             classmethod(no_bool_for_number))})
        if name in refusing:
            with pytest.raises(ValidationError, match="expects a number, not the boolean true"):
                model(**{name: True})
        else:
            try:
                model(**{name: True})
            except ValidationError as exc:  # str's own refusal, not this rule's
                assert "expects a number" not in str(exc), name


@pytest.mark.parametrize("value, expected", [
    (None, "slurm.cpus_per_task: must be positive"),
    (0, "slurm.cpus_per_task: must be positive (got 0)"),
    ("", "slurm.cpus_per_task: must be positive (got '')"),
])
def test_a_field_error_quotes_any_value_given_even_a_falsy_one(value, expected):
    """A value of 0 or "" is what was given and is quoted; only no value at all is left out."""
    from harness.errors import FieldError

    assert str(FieldError("slurm.cpus_per_task", "must be positive", value)) == expected


@pytest.mark.parametrize("given, stem, folder", [
    (".my_methods", "my_methods", "."), ("my_methods.py", "my_methods", "."), ("sub\\my_methods", "my_methods", "sub"),
])
def test_a_module_named_as_a_file_says_the_module_name_and_folder_to_use(given, stem, folder):
    """A relative import, a bare file name and a Windows path are file paths, each answered with the
    module name and the folder to put on the import path."""
    from harness.imports import import_module

    with pytest.raises(KeyError) as caught:
        import_module(given)
    assert caught.value.args[0] == (f"{given!r} is a file path, not a module: name the module as Python imports "
                                    f"it ({stem!r}, run with PYTHONPATH={folder})")


def test_a_broken_module_is_told_from_a_missing_one_and_named_at_its_failing_line(tmp_path, monkeypatch):
    """A module whose own import fails is broken, not missing, even when the missing name begins
    its name; the line named is the one that raised, inside a function the module called."""
    from harness.imports import import_module

    (tmp_path / "zq_mod_extra.py").write_text("import zq_mod\n")
    (tmp_path / "zq_raises_deep.py").write_text("def f():\n    raise ValueError('bad')\n\n\nf()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyError) as caught:
        import_module("zq_mod_extra")
    assert caught.value.args[0] == (f"importing module 'zq_mod_extra' failed at {tmp_path / 'zq_mod_extra.py'}:1: "
                                    "ModuleNotFoundError: No module named 'zq_mod'")
    with pytest.raises(KeyError) as caught:
        import_module("zq_raises_deep")
    assert caught.value.args[0] == (f"importing module 'zq_raises_deep' failed at {tmp_path / 'zq_raises_deep.py'}:2: "
                                    "ValueError: bad")


def test_a_package_in_the_current_folder_gets_the_import_path_hint(tmp_path, monkeypatch):
    """``pkg.methods`` where ``pkg/`` lies in the current folder: the hint names the package."""
    import sys

    from harness.imports import import_module

    (tmp_path / "zq_beside_pkg").mkdir()
    (tmp_path / "zq_beside_pkg" / "__init__.py").write_text("")
    (tmp_path / "zq_beside_pkg" / "methods.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(KeyError) as caught:
        import_module("zq_beside_pkg.methods")
    assert caught.value.args[0].endswith("; zq_beside_pkg lies in the current folder, which harness does not "
                                         "import from: run PYTHONPATH=. harness ...")


def test_a_missing_name_is_never_answered_with_a_private_one(tmp_path, monkeypatch):
    """``_Blend`` is the module's own; a slip for ``Blend`` is not pointed at it."""
    from harness.imports import import_object

    (tmp_path / "zq_private.py").write_text("_Blend = 1\nOther = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyError) as caught:
        import_object("zq_private:Blend")
    assert caught.value.args[0] == f"module 'zq_private' ({tmp_path / 'zq_private.py'}) has no 'Blend'"


# -- several schema mistakes at once: a line each, the first as it is alone ----------------------


def _error_lines(raw: dict, file: str = "s.yaml") -> list[str]:
    from harness.config import validate_config
    from harness.config_errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        validate_config(raw, file)
    return str(caught.value).splitlines()


def test_mistakes_in_different_sections_are_all_reported_at_once(sweep_dict, tmp_path):
    """A typo in ``tasks:`` and another in ``methods:`` are both told in one run, each with its
    file, field and value, the first line the one a file with that mistake alone gets."""
    bad = copy.deepcopy(sweep_dict)
    bad["tasks"] = [{"name": "toy_stripes", "optons": {}}, 3]
    bad["methods"][1]["label"] = 5
    bad["eval"] = {"batch_size": 0}
    f = tmp_path / "two.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    assert code == 2, (out, err)
    assert err.splitlines() == [
        f"error: {f}: tasks.0.optons: unknown key; did you mean 'options'?",
        f"{f}: tasks.1: Input should be a name or a mapping (got 3)",
        f"{f}: methods.1.label: Input should be a valid string (got 5)",
        f"{f}: eval.batch_size: Input should be greater than or equal to 1 (got 0)",
    ]
    assert "Traceback" not in out + err
    alone = copy.deepcopy(sweep_dict)
    alone["tasks"] = [{"name": "toy_stripes", "optons": {}}, "toy_colours"]
    f.write_text(yaml.safe_dump(alone))
    assert _run(["validate", str(f)])[2].splitlines() == [err.splitlines()[0]]
    f.write_text(yaml.safe_dump(bad))
    for args in (["sweep", str(f)], ["sweep", "--dry-run", str(f)]):
        code, out, again = _run(args)
        assert code == 2 and again == err, (args, out, again)
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_misspelt_required_key_is_not_reported_missing_beside_other_mistakes(sweep_dict):
    """``task:`` for ``tasks:`` reads as an unknown key and a missing field: the typo's line
    alone says it (whose did-you-mean names the missing field), the other mistakes follow."""
    bad = dict(sweep_dict, seed=-1)
    bad["task"] = bad.pop("tasks")
    bad["methods"] = [{"nme": "weight_averaging"}]  # the same slip inside a list entry
    assert _error_lines(bad) == [  # pydantic's order: a model's fields, then its unknown keys
        "s.yaml: methods.0.nme: unknown key; did you mean 'name'?",
        "s.yaml: seed: Input should be greater than or equal to 0 (got -1)",
        "s.yaml: task: unknown key; did you mean 'tasks'?",
    ]


def test_an_unknown_key_close_to_no_field_leaves_the_missing_one_reported(sweep_dict):
    """A key that misspells no field is no evidence of the missing one: both are told."""
    bad = dict(sweep_dict, zzzz=1)
    del bad["tasks"]
    assert _error_lines(bad) == ["s.yaml: zzzz: unknown key", "s.yaml: tasks: required field is missing"]


@pytest.mark.parametrize("lambdas,first", [
    ("many", "references.routing_bound_lambda: Input should be a valid number, unable to parse string as a "
             "number (got 'many')"),
    (["x", 1, "y"], "references.routing_bound_lambda.0: Input should be a valid number, unable to parse string as "
                    "a number (got 'x')"),
])
def test_a_mistake_pydantic_reports_once_per_union_member_is_one_line(lambdas, first, sweep_dict):
    """``float | list[float]``: a value that fits neither is one mistake, reported by pydantic for
    each member (and for each bad item of the list): one line, the member's reaching deepest into
    the value (a list's first bad item, not the whole list as no number), no member's name in the path."""
    lines = _error_lines(dict(sweep_dict, references={"routing_bound_lambda": lambdas}, threads=2.5))
    assert lines == ["s.yaml: threads: Input should be a valid integer, got a number with a fractional part (got 2.5)",
                     f"s.yaml: {first}"]  # threads: int | 'auto', a union too


def test_many_mistakes_are_capped_with_a_count_of_the_rest(sweep_dict):
    from harness.config_errors import MAX_ERRORS

    bad = dict(sweep_dict, **{f"extra_{i:02d}": i for i in range(MAX_ERRORS + 5)})
    lines = _error_lines(bad)
    assert lines[:MAX_ERRORS] == [f"s.yaml: extra_{i:02d}: unknown key" for i in range(MAX_ERRORS)]
    assert lines[MAX_ERRORS:] == ["... and 5 more"]
    exactly = dict(sweep_dict, **{f"extra_{i:02d}": i for i in range(MAX_ERRORS)})
    assert len(_error_lines(exactly)) == MAX_ERRORS  # all shown: no count line


def test_each_line_names_the_override_that_set_its_field(sweep_dict, tmp_path):
    """An override's mistake is told with the command line (item, over the file), the file's
    own mistakes with the file, whichever comes first."""
    bad = dict(sweep_dict, seed="abc")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, _, err = _run(["validate", str(f), "evall.batch_size=4", "executor.workers=0", "threads=8"])
    assert code == 2
    assert err.splitlines() == [
        f"error: <command line> (evall.batch_size=4, over {f}): evall: unknown key; did you mean 'eval'?",
        f"{f}: seed: Input should be a valid integer, unable to parse string as an integer (got 'abc')",
        f"<command line> (executor.workers=0, over {f}): executor.workers: Input should be greater than or equal "
        "to 1 (got 0)",
    ]


def test_several_embedded_suite_mistakes_are_all_reported(tmp_path):
    f = tmp_path / "emb.yaml"
    f.write_text(yaml.safe_dump({"name": "e", "model": {"source": "embedded", "suite": {
        "size": "huge", "finetune_stepz": 3, "finetune_lr": -1}}, "tasks": ["emb_mnist"]}))
    code, _, err = _run(["validate", str(f), "model.suite.seed=-2"])
    assert code == 2
    assert err.splitlines() == [
        f"error: {f}: model.suite.finetune_stepz: unknown key; did you mean 'finetune_steps'?",
        f"{f}: model.suite.size: Input should be 'full' or 'tiny' (got 'huge')",
        f"<command line> (model.suite.seed=-2, over {f}): model.suite.seed: Input should be greater than or equal "
        "to 0 (got -2)",
        f"{f}: model.suite.finetune_lr: Input should be greater than 0 (got -1)",
    ]


# -- mistakes the checks after the schema find: each entry's first, all entries at once --------


def test_unknown_names_and_bad_hyperparameters_of_several_entries_are_all_reported(sweep_dict, tmp_path):
    """A misspelt method, a hyperparameter out of its bounds, a misspelt task and an unseen task
    that is none of the sweep's are told in one run, in the checks' order (methods, then tasks),
    the first line the one that mistake alone gets; nothing is built."""
    bad = copy.deepcopy(sweep_dict)
    bad["methods"] = ["task_arithmetc", {"name": "ties", "params": {"k": 500}}, "weight_averaging"]
    bad["tasks"] = ["toy_stripes", "toy_colour", "toy_checks"]
    bad["unseen"] = ["toy_blob"]
    f = tmp_path / "names.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"error: {f}: methods.0: unknown method 'task_arithmetc'; did you mean "
                               "'task_arithmetic'?")
    assert lines[1] == f"{f}: methods.1.params.k: Input should be less than or equal to 100 (got 500)"
    assert lines[2].startswith(f"{f}: tasks.1: unknown task 'toy_colour'; did you mean 'toy_colours'?")
    assert lines[3] == f"{f}: unseen.0: not one of the sweep's tasks (got 'toy_blob')"
    alone = copy.deepcopy(sweep_dict)
    alone["methods"] = ["task_arithmetc"]
    f.write_text(yaml.safe_dump(alone))
    assert _run(["validate", str(f)])[2].splitlines() == [lines[0]]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_every_misnamed_entry_of_the_task_lists_is_reported_at_once(sweep_dict, tmp_path):
    """Misnamed entries in ``seen``, ``unseen``, ``model.heads`` and the generalization block were
    told one per run (the first only); each is a line of one error, and the split's own checks
    (a task neither seen nor unseen) do not add a line for what a misspelling left out."""
    d = copy.deepcopy(sweep_dict)
    d["seen"] = ["toy_stripe", "toy_colour"]
    d["unseen"] = ["toy_x"]
    d["model"]["heads"] = {"toy_strpes": "a.pt"}
    f = tmp_path / "lists.yaml"
    f.write_text(yaml.safe_dump(d))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and "Traceback" not in out + err
    assert err.splitlines() == [
        f"error: {f}: seen.0: not one of the sweep's tasks; did you mean 'toy_stripes'? (got 'toy_stripe')",
        f"{f}: seen.1: not one of the sweep's tasks; did you mean 'toy_colours'? (got 'toy_colour')",
        f"{f}: unseen.0: not one of the sweep's tasks (got 'toy_x')",
        f"{f}: model.heads.toy_strpes: neither one of the sweep's tasks (toy_stripes, toy_colours) nor a "
        "registered task; did you mean 'toy_stripes'?",
    ]
    g = copy.deepcopy(sweep_dict)
    g["generalization"] = {"unseen": ["toy_colour", "toy_strip"]}
    f.write_text(yaml.safe_dump(g))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    assert [line.removeprefix("error: ").split(": ")[1] for line in err.splitlines()] == [
        "generalization.unseen.0", "generalization.unseen.1"], err


@pytest.mark.parametrize("block", ["unseen", "generalization", "robustness"])
def test_a_task_list_suggests_no_misspelt_task_of_the_sweep(block, sweep_dict, tmp_path):
    """A task misspelt in ``tasks`` and written right in a list naming the sweep's tasks: the
    list's line suggested the misspelling itself ("did you mean 'toy_colour'?" for 'toy_colours');
    it suggests only the sweep's valid tasks, so here none."""
    d = copy.deepcopy(sweep_dict)
    d["tasks"] = ["toy_stripes", "toy_colour"]
    field = {"unseen": "unseen.0", "generalization": "generalization.unseen.0", "robustness": "robustness.tasks.0"}
    if block == "unseen":
        d["unseen"] = ["toy_colours"]
    elif block == "generalization":
        d["generalization"] = {"unseen": ["toy_colours"]}
    else:
        d["robustness"] = {"tasks": ["toy_colours"], "corruptions": ["contrast"]}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    code, out, err = _run(["validate", str(f)])
    lines = err.splitlines()
    assert code == 2 and lines[0].startswith(f"error: {f}: tasks.1: unknown task 'toy_colour'; did you mean "
                                             "'toy_colours'?"), err
    assert lines[1:] == [f"{f}: {field[block]}: not one of the sweep's tasks (got 'toy_colours')"], err


def test_every_task_the_embedded_suite_has_no_model_of_is_reported_at_once(tmp_path):
    """Two tasks the embedded suite has no fine-tuned model of: the second was told only once
    the first was fixed; each is a line, after a misspelt task's own line."""
    f = tmp_path / "emb.yaml"
    f.write_text(yaml.safe_dump({"name": "e", "model": {"source": "embedded"},
                                 "tasks": ["emb_mnist", "emb_fashon", "toy_stripes", "toy_colours"]}))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    lines = err.splitlines()
    assert [line.removeprefix("error: ").split(": ")[1] for line in lines] == ["tasks.1", "tasks.2", "tasks.3"], err
    assert "unknown task 'emb_fashon'" in lines[0]
    assert all("has no fine-tuned model" in line for line in lines[1:]), err


def test_a_field_two_checks_find_at_fault_is_one_line(tmp_path):
    """An unknown task in an embedded sweep is at fault as a task (unknown) and as one the suite
    has no model of: one line, the first check's."""
    f = tmp_path / "emb.yaml"
    f.write_text(yaml.safe_dump({"name": "e", "model": {"source": "embedded"}, "tasks": ["emb_mnist", "shapez"],
                                 "methods": [{"name": "ties", "params": {"k": 0}}]}))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    lines = err.splitlines()
    assert [line.removeprefix("error: ").split(": ")[1] for line in lines] == ["methods.0.params.k", "tasks.1"], lines
    assert "unknown task 'shapez'" in lines[1] and "no fine-tuned model" not in err


def test_a_later_check_s_line_names_the_override_that_set_its_field(sweep_dict, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, methods=["task_arithmetc"])))
    code, _, err = _run(["validate", str(f), "tasks.0=toy_stripez"])
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {f}: methods.0: unknown method"), lines
    assert lines[1].startswith(f"<command line> (tasks.0=toy_stripez, over {f}): tasks.0: unknown task 'toy_stripez'")


# -- what the fields point at: every missing file and folder at once ------------------------------


def test_every_missing_checkpoint_and_a_bad_output_folder_are_reported_together(sweep_dict, tmp_path):
    """Two tasks' missing checkpoints (one named, one by the pattern) and an output folder that
    is a file are three lines of one run, each naming its field, task and path."""
    bad = dict(copy.deepcopy(sweep_dict), tasks=["toy_stripes", "toy_colours", "toy_checks", "toy_blobs"])
    pattern = str(tmp_path / "nowhere" / "{task}.safetensors")
    bad["model"]["finetuned_pattern"] = pattern
    bad["model"]["finetuned"] = {"toy_stripes": sweep_dict["model"]["finetuned_pattern"].format(task="toy_stripes"),
                                 "toy_colours": str(tmp_path / "gone.safetensors")}
    (tmp_path / "taken").write_text("x")
    bad["output_dir"] = str(tmp_path / "taken")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and "Traceback" not in out + err
    missing = ["toy_checks", "toy_blobs"]
    assert err.splitlines() == [
        f"error: {f}: model.finetuned.toy_colours: checkpoint does not exist "
        f"(got {str(tmp_path / 'gone.safetensors')!r})",
        *(f"{f}: model.finetuned_pattern: checkpoint of task {t!r} does not exist "
          f"(got {pattern.format(task=t)!r})" for t in missing),
        f"{f}: output_dir: is a file, not a folder (got {str(tmp_path / 'taken')!r})",
    ]


def test_a_missing_checkpoint_and_a_cache_folder_that_is_a_file_are_reported_together(sweep_dict, tmp_path):
    """A bad cache folder stops only the reading of the model files (which takes the encoder
    summaries kept there), not the check that they exist: one run names both."""
    bad = copy.deepcopy(sweep_dict)
    bad["model"]["finetuned"] = {"toy_colours": str(tmp_path / "gone.safetensors")}
    (tmp_path / "taken").write_text("x")
    bad["cache_dir"] = str(tmp_path / "taken")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, out, err = _run(["validate", str(f)])
    assert code == 2 and "Traceback" not in out + err
    assert err.splitlines() == [
        f"error: {f}: cache_dir: is a file, not a folder (got {str(tmp_path / 'taken')!r})",
        f"{f}: model.finetuned.toy_colours: checkpoint does not exist (got {str(tmp_path / 'gone.safetensors')!r})",
    ]


def test_every_task_s_missing_data_folder_is_reported(sweep_dict, tmp_path):
    """Two datasets read from one missing top-level data_root and one from its own: a line
    for each task, naming it."""
    bad = dict(sweep_dict, tasks=["mnist", "svhn", {"name": "eurosat", "options": {"data_root": str(tmp_path / "e")}}],
               data_root=str(tmp_path / "d"))
    one = sweep_dict["model"]["finetuned_pattern"].format(task="toy_stripes")  # any existing checkpoint: not read
    bad["model"] = {k: v for k, v in bad["model"].items() if k != "finetuned_pattern"}
    bad["model"]["finetuned"] = {t: one for t in ("mnist", "svhn", "eurosat")}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    d, e = str(tmp_path / "d"), str(tmp_path / "e")
    assert err.splitlines() == [
        f"error: {f}: data_root: data folder of task 'mnist' does not exist (got {d!r})",
        f"{f}: data_root: data folder of task 'svhn' does not exist (got {d!r})",
        f"{f}: tasks.2.options.data_root: data folder of task 'eurosat' does not exist (got {e!r})",
    ]


def test_a_missing_pretrained_file_leaves_the_other_missing_files_reported(tmp_path):
    """The pretrained weights, an unknown architecture, two tasks' checkpoints and their data
    folder, all missing or wrong: a line each, in one run."""
    f = tmp_path / "s.yaml"
    nope = tmp_path / "nope"
    f.write_text(yaml.safe_dump({
        "name": "t", "tasks": ["mnist", "svhn"], "methods": ["task_arithmetic"], "data_root": str(nope / "data"),
        "output_dir": str(tmp_path / "out"),
        "model": {"source": "files", "arch": "ViT-Q-99", "pretrained": str(nope / "pre.safetensors"),
                  "finetuned_pattern": str(nope / "{task}.safetensors")}}))
    code, _, err = _run(["validate", str(f)])
    assert code == 2
    lines = [line.removeprefix("error: ").removeprefix(f"{f}: ") for line in err.splitlines()]
    assert [line.split(": ")[0] for line in lines] == [
        "model.pretrained", "model.arch", "model.finetuned_pattern", "model.finetuned_pattern", "data_root",
        "data_root"], lines
    assert lines[0] == f"model.pretrained: weights file does not exist (got {str(nope / 'pre.safetensors')!r})"
    assert "'ViT-Q-99'" in lines[1]
    assert [("'mnist'" in line, "'svhn'" in line) for line in lines[2:]] == [(True, False), (False, True)] * 2

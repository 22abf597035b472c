"""How a job's setting and title read (table cells, progress lines, MLflow run names), against
strings written out by hand."""

from __future__ import annotations

from harness.plan import job_title, setting_text


def test_a_setting_reads_as_written_with_long_floats_cut_to_four_digits():
    params = {"scaling": 0.5939321535345923, "k": 20, "lr": 0.001, "tol": 1e-05, "mix": 0.123456, "x": 1.0}
    assert setting_text(params) == "scaling=0.5939, k=20, lr=0.001, tol=1e-05, mix=0.1235, x=1.0"


def test_a_float_is_cut_from_seven_characters_on():
    """``0.1234`` (six characters) reads as written; ``0.12345`` (seven) is cut to ``0.1235``."""
    assert setting_text({"a": 0.1234, "b": 0.12345, "c": 12345.6}) == "a=0.1234, b=0.1235, c=1.235e+04"


def test_a_long_integer_or_text_reads_as_written():
    """Only floats are cut: a seven-digit step count or a long name is exact in YAML and stays so."""
    assert setting_text({"steps": 1234567, "name": "abcdefgh", "on": True}) == "steps=1234567, name=abcdefgh, on=True"


def test_a_setting_keeps_the_order_its_params_were_given_in():
    assert setting_text({"scaling": 0.3, "k": 20}) == "scaling=0.3, k=20"


def test_job_titles_name_task_label_setting_and_a_robustness_job():
    assert job_title("individual", "toy_stripes", "individual") == "individual/toy_stripes"
    assert job_title("perfect_routing", "toy_stripes", "perfect routing", {"scaling": 1.0}) == "perfect_routing/toy_stripes"
    assert job_title("merge", None, "ta", {"scaling": 0.3}) == "ta(scaling=0.3)"
    assert job_title("merge", None, "weight_averaging", {}) == "weight_averaging"
    assert job_title("robustness", None, "ta", {"scaling": 0.3}) == "robustness/ta(scaling=0.3)"


def test_bound_jobs_beside_others_are_titled_by_their_lambda_and_every_job_of_a_sweep_by_its_own_title(sweep_dict):
    """Two bound lambdas gave both bound jobs of a task the title ``perfect_routing/<task>``:
    progress lines, failure summaries and MLflow run names could not tell them apart. Each is now
    titled as its row is labelled, and no two jobs of such a sweep share a title."""
    from harness.config import validate_config
    from harness.plan import plan_jobs

    assert job_title("perfect_routing", "toy_stripes", "perfect routing (0.6)", {"scaling": 0.6}) == \
        "perfect_routing/toy_stripes (0.6)"
    d = {**sweep_dict, "references": {"perfect_routing": True, "routing_bound_lambda": [0.3, 0.6]},
         "methods": [{"name": "task_arithmetic", "grid": {"scaling": [0.3, 0.6]}}, {"name": "weight_averaging"}]}
    titles = [s.title for s in plan_jobs(validate_config(d))]  # each a distinct job (kind, label, setting, task)
    assert len(titles) == 1 + 2 + 2 * 2 + 2 + 1 and len(set(titles)) == len(titles), sorted(titles)
    assert {t for t in titles if t.startswith("perfect_routing/toy_stripes")} == {
        "perfect_routing/toy_stripes (0.3)", "perfect_routing/toy_stripes (0.6)"}

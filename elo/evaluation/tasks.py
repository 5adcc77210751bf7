"""Log-likelihood benchmarks, built exactly as lm-evaluation-harness 0.4 builds its tasks of the same names.

Each task reads its documents from the Hugging Face Hub dataset lm-eval reads (the default: the dataset's parquet
export, through huggingface_hub's cache, so that a cached dataset also works offline with HF_HUB_OFFLINE=1), or from a
data dir of JSONL files (`--data-dir`, offline; schemas: shared/data/README.md; examples/data/eval holds KoBEST COPA).
Both give the same documents: the Hub's columns are the data dir's fields (JNLI's label aside: its ClassLabel id on
the Hub, its name in the data dir). Per document a task produces one context string and one continuation per answer
choice: lm-eval's `multiple_choice` output type. Everything that decides what the model sees is lm-eval's: prompt
templates, `target_delimiter`, `description`, few-shot split, sampler and seed (`random.Random(1234)`, one generator
per task drawn in document order), `fewshot_delimiter`. The metrics are lm-eval's too: `acc` (argmax
log-likelihood), `acc_norm` (log-likelihood divided by the choice's length in characters; lm-eval's `acc_bytes` is the
byte-length variant, not `acc_norm`) and `f1` (sklearn's macro F1).

Our names map to lm-eval's tasks (Hub dataset, config):
    kobest_boolq ... kobest_wic -> kobest_* (identical names; skt/kobest_v1, boolq ... wic; eval split = test,
                                   few-shot from train)
    mmlu                        -> the mmlu group restricted to 12 subjects (those of the data dir), each its own
                                   task mmlu_<subject> (cais/mmlu, <subject>; eval = test, few-shot = the first k of
                                   that subject's dev; a limit applies to each subject, as in lm-eval); the group's acc
                                   is the mean over all documents, as lm-eval weights subtasks by size
    jcommonsenseqa              -> ja_leaderboard_jcommonsenseqa (shunk031/JGLUE, JCommonsenseQA; eval = validation,
                                   few-shot from train, k=3 default)
    jnli                        -> ja_leaderboard_jnli (shunk031/JGLUE, JNLI; eval = validation, few-shot from train,
                                   k=3 default; the data dir has no JNLI train, so from there only zero-shot runs)
lm-eval names Rakuten/JGLUE for JGLUE, which has left the Hub; shunk031/JGLUE stands in: the same config and split
names, and the columns lm-eval's templates read. Its parquet export may hold an earlier JGLUE release (v1.1) than the
data dir's v1.3, so scores on the two may differ slightly. MARC-ja (ja_leaderboard_marc_ja) exists in neither and
nothing stands in for it.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from huggingface_hub import snapshot_download

from elo.tools.jsonl import read_jsonl

FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed
# The Hub's parquet export of a dataset, whatever it was uploaded as (a loading script, JSON, CSV, parquet): one
# layout, {config}/{split}/NNNN.parquet, for every dataset
HUB_REVISION = "refs/convert/parquet"

MMLU_SUBJECTS = (
    "abstract_algebra", "astronomy", "college_physics", "computer_security", "philosophy", "high_school_us_history",
    "international_law", "high_school_government_and_politics", "sociology", "econometrics", "college_medicine",
    "marketing",
)
JA_DESCRIPTION = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
JNLI_LABELS = ("entailment", "contradiction", "neutral")  # the ClassLabel order of the HF JGLUE dataset lm-eval reads
KOBEST = "skt/kobest_v1"
JGLUE = "shunk031/JGLUE"  # lm-eval's Rakuten/JGLUE has left the Hub (module docstring)


@dataclass(frozen=True)
class HubSource:
    """Where lm-eval reads a task on the Hugging Face Hub: dataset id, config (lm-eval's dataset_name) and the splits
    it evaluates on and draws few-shot examples from."""

    dataset: str
    config: str
    eval_split: str
    fewshot_split: str


@dataclass(frozen=True)
class Task:
    name: str
    lm_eval_name: str
    hub: HubSource
    eval_file: str  # relative to the data dir
    fewshot_file: str | None  # None: the data dir lacks the split lm-eval draws few-shot examples from
    fields: tuple[str, ...]  # what every record must have; a document is these fields
    doc_to_text: Callable[[dict], str]
    doc_to_choice: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], int]  # index of the gold choice
    metrics: tuple[str, ...]
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    sampler: str = "random"  # lm-eval's "default" sampler; "first_n" takes the split's first k documents
    num_fewshot: int = 0  # lm-eval's default for the task
    keep: Callable[[dict], bool] | None = field(default=None, repr=False)  # record filter (MMLU subject)
    from_hub: Callable[[dict], dict] | None = field(default=None, repr=False)  # a Hub row as the data dir has it


@dataclass
class Instance:
    """One document: its context, and the continuation scored for each choice."""

    task: str
    doc_id: int
    context: str
    choices: list[str]
    gold: int
    target_delimiter: str = " "

    @property
    def continuations(self) -> list[str]:
        return [self.target_delimiter + c for c in self.choices]


def _copa_text(d: dict) -> str:
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}[d["question"].strip()]
    return f"{d['premise']} {connector}"


def _jcqa_text(d: dict) -> str:
    options = "".join(f"- {c}\n" for c in _jcqa_choices(d))
    return f"### 指示：\n出力は以下から選択してください：\n{options}\n### 入力：\n{d['question']}\n\n### 応答："


def _jcqa_choices(d: dict) -> list[str]:
    return [d[f"choice{i}"] for i in range(5)]


def _jnli_target(d: dict) -> int:
    if d["label"] not in JNLI_LABELS:
        raise ValueError(f"JNLI label {d['label']!r} is not one of {', '.join(JNLI_LABELS)}")
    return JNLI_LABELS.index(d["label"])


def _mmlu_task(subject: str) -> Task:
    return Task(
        name=f"mmlu_{subject}",
        lm_eval_name=f"mmlu_{subject}",
        hub=HubSource("cais/mmlu", subject, "test", "dev"),
        eval_file="mmlu/test_12subjects.jsonl",
        fewshot_file="mmlu/dev_12subjects.jsonl",
        fields=("subject", "question", "choices", "answer"),
        doc_to_text=lambda d: (f"{d['question'].strip()}\nA. {d['choices'][0]}\nB. {d['choices'][1]}\n"
                               f"C. {d['choices'][2]}\nD. {d['choices'][3]}\nAnswer:"),
        doc_to_choice=lambda d: ["A", "B", "C", "D"],
        doc_to_target=lambda d: int(d["answer"]),
        metrics=("acc",),
        description=f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
        sampler="first_n",
        keep=lambda d: d["subject"] == subject,
    )


_TASK_LIST = [
    Task(
        name="kobest_boolq", lm_eval_name="kobest_boolq", hub=HubSource(KOBEST, "boolq", "test", "train"),
        eval_file="kobest/boolq_test.jsonl", fewshot_file="kobest/boolq_train.jsonl",
        fields=("paragraph", "question", "label"),
        doc_to_text=lambda d: f"{d['paragraph']} 질문: {d['question']} 답변: ",
        doc_to_choice=lambda d: ["아니오", "예"],
        doc_to_target=lambda d: int(d["label"]),
        metrics=("acc", "f1"),
    ),
    Task(
        name="kobest_copa", lm_eval_name="kobest_copa", hub=HubSource(KOBEST, "copa", "test", "train"),
        eval_file="kobest/copa_test.jsonl", fewshot_file="kobest/copa_train.jsonl",
        fields=("premise", "question", "alternative_1", "alternative_2", "label"),
        doc_to_text=_copa_text,
        doc_to_choice=lambda d: [d["alternative_1"], d["alternative_2"]],
        doc_to_target=lambda d: int(d["label"]),
        metrics=("acc", "f1"),
    ),
    Task(
        name="kobest_wic", lm_eval_name="kobest_wic", hub=HubSource(KOBEST, "wic", "test", "train"),
        eval_file="kobest/wic_test.jsonl", fewshot_file="kobest/wic_train.jsonl",
        fields=("word", "context_1", "context_2", "label"),
        doc_to_text=lambda d: (f"문장1: {d['context_1']} 문장2: {d['context_2']} "
                               f"두 문장에서 {d['word']}가 같은 뜻으로 쓰였나?"),
        doc_to_choice=lambda d: ["아니오", "예"],
        doc_to_target=lambda d: int(d["label"]),
        metrics=("acc", "f1"),
    ),
    Task(
        name="kobest_hellaswag", lm_eval_name="kobest_hellaswag", hub=HubSource(KOBEST, "hellaswag", "test", "train"),
        eval_file="kobest/hellaswag_test.jsonl", fewshot_file="kobest/hellaswag_train.jsonl",
        fields=("context", "ending_1", "ending_2", "ending_3", "ending_4", "label"),
        doc_to_text=lambda d: f"문장: {d['context']}",
        doc_to_choice=lambda d: [d["ending_1"], d["ending_2"], d["ending_3"], d["ending_4"]],
        doc_to_target=lambda d: int(d["label"]),
        metrics=("acc", "acc_norm", "f1"),
    ),
    Task(
        name="kobest_sentineg", lm_eval_name="kobest_sentineg", hub=HubSource(KOBEST, "sentineg", "test", "train"),
        eval_file="kobest/sentineg_test.jsonl", fewshot_file="kobest/sentineg_train.jsonl",
        fields=("sentence", "label"),
        doc_to_text=lambda d: f"문장: {d['sentence']} 긍부정:",
        doc_to_choice=lambda d: ["부정", "긍정"],
        doc_to_target=lambda d: int(d["label"]),
        metrics=("acc", "f1"),
    ),
    *[_mmlu_task(s) for s in MMLU_SUBJECTS],
    Task(
        name="jcommonsenseqa", lm_eval_name="ja_leaderboard_jcommonsenseqa",
        hub=HubSource(JGLUE, "JCommonsenseQA", "validation", "train"),
        eval_file="jglue/jcommonsenseqa_v1.3_valid.jsonl", fewshot_file="jglue/jcommonsenseqa_v1.3_train.jsonl",
        fields=("question", "choice0", "choice1", "choice2", "choice3", "choice4", "label"),
        doc_to_text=_jcqa_text,
        doc_to_choice=_jcqa_choices,
        doc_to_target=lambda d: int(d["label"]),
        metrics=("acc",),
        description=JA_DESCRIPTION, target_delimiter="\n", num_fewshot=3,
    ),
    Task(
        name="jnli", lm_eval_name="ja_leaderboard_jnli", hub=HubSource(JGLUE, "JNLI", "validation", "train"),
        eval_file="jglue/jnli_v1.3_valid.jsonl", fewshot_file=None,
        fields=("sentence1", "sentence2", "label"),
        doc_to_text=lambda d: ("### 指示：\n与えられた前提と仮説の関係を回答してください。\n\n出力は以下から選択してください：\n"
                               f"含意\n矛盾\n中立\n\n### 入力：\n前提：{d['sentence1']}\n仮説：{d['sentence2']}\n\n### 応答："),
        doc_to_choice=lambda d: ["含意", "矛盾", "中立"],
        doc_to_target=_jnli_target,
        metrics=("acc",),
        description=JA_DESCRIPTION, target_delimiter="\n", num_fewshot=3,
        from_hub=lambda d: {**d, "label": JNLI_LABELS[d["label"]]},  # the Hub has the ClassLabel id, not its name
    ),
]
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
GROUPS: dict[str, tuple[str, ...]] = {"mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)}
UNAVAILABLE = dict.fromkeys(
    ("marc_ja", "marc-ja", "ja_leaderboard_marc_ja"),
    "MARC-ja is not available: the Amazon reviews corpus it is built from was withdrawn, it is on the Hub in no "
    "form lm-eval reads, and nothing stands in for it",
)


def known_names() -> list[str]:
    """Every name `expand` accepts: groups, then tasks outside any group."""
    grouped = {t for members in GROUPS.values() for t in members}
    return list(GROUPS) + [n for n in TASKS if n not in grouped]


def expand(names: list[str]) -> dict[str, list[str]]:
    """Requested names -> the tasks each one runs (a group runs its members); unknown names are an error."""
    out: dict[str, list[str]] = {}
    for name in names:
        if name in UNAVAILABLE:
            raise ValueError(f"task {name!r} cannot run: {UNAVAILABLE[name]}")
        if name in GROUPS:
            out[name] = list(GROUPS[name])
        elif name in TASKS:
            out[name] = [name]
        else:
            raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_names())}")
    return out


def fewshot_count(task: Task, num_fewshot: int | None, data_dir: Path | None) -> int:
    """Few-shot examples a run uses: `num_fewshot`, or lm-eval's default for the task when None."""
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {k}")
    if k > 0 and data_dir is not None and task.fewshot_file is None:
        raise ValueError(f"{task.name} needs {k} few-shot examples from a train split that the data dir {data_dir} "
                         f"lacks (this project's JGLUE files have no JNLI train); run it with --num-fewshot 0, or "
                         f"from the Hub (no --data-dir)")
    return k


def split_files(task: Task, data_dir: Path | None, fewshot: bool = False) -> list[Path]:
    """The files holding the task's evaluation (or few-shot) split: a JSONL file in `data_dir`, or, when `data_dir` is
    None, the Hub dataset's parquet shards."""
    if data_dir is not None:
        return [Path(data_dir) / (task.fewshot_file if fewshot else task.eval_file)]
    split = task.hub.fewshot_split if fewshot else task.hub.eval_split
    return hub_files(task.hub.dataset, f"{task.hub.config}/{split}")


def data_files(task: Task, data_dir: Path | None, num_fewshot: int | None) -> list[Path]:
    """The files a run of `task` reads (from the Hub: fetched into the Hugging Face cache, or found there offline)."""
    files = split_files(task, data_dir)
    if fewshot_count(task, num_fewshot, data_dir) > 0:
        files += split_files(task, data_dir, fewshot=True)
    return files


def hub_files(dataset: str, split_dir: str) -> list[Path]:
    """The parquet shards under `split_dir` ("{config}/{split}") of a Hub dataset's parquet export, downloaded into
    huggingface_hub's cache, or read from it offline (HF_HUB_OFFLINE=1). pyarrow, which reads them, is checked first:
    a missing hub extra fails before any download."""
    _parquet()
    pattern = f"{split_dir}/*.parquet"
    try:
        snapshot = snapshot_download(dataset, repo_type="dataset", revision=HUB_REVISION, allow_patterns=pattern)
    except OSError as e:  # offline and not cached, unknown dataset, Hub down: huggingface_hub's errors run many lines
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"Hub dataset {dataset} ({pattern} at {HUB_REVISION}) is not in the Hugging Face cache "
                                f"and the Hub could not provide it ({reason}); go online once to cache it, or pass "
                                f"--data-dir DIR with the benchmark as JSONL files") from e
    files = sorted(Path(snapshot).glob(pattern))
    if not files:
        raise FileNotFoundError(f"Hub dataset {dataset} has no files {pattern} at {HUB_REVISION}")
    return files


def _parquet() -> ModuleType:
    try:
        import pyarrow.parquet  # optional: only benchmarks read from the Hub need it
    except ModuleNotFoundError:
        raise ValueError('reading benchmarks from the Hub needs pyarrow; install it with pip install -e ".[hub]", or '
                         'pass --data-dir DIR with the benchmark as JSONL files') from None
    return pyarrow.parquet


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for each record of a JSONL file or a parquet file."""
    if path.suffix == ".parquet":
        return [(f"{path} row {i}", row) for i, row in enumerate(_parquet().read_table(path).to_pylist())]
    return [(f"{path}:{n}", record) for n, record in read_jsonl(path)]


def load_docs(task: Task, files: list[Path]) -> list[dict]:
    """The documents of one split: each record reduced to the task's fields (a Hub row then mapped to the data dir's
    form), those the task keeps."""
    docs = []
    for path in files:
        from_hub = task.from_hub if path.suffix == ".parquet" else None
        for where, record in _records(path):
            missing = [k for k in task.fields if k not in record]
            if missing:
                raise ValueError(f"{where}: record lacks field(s) {', '.join(missing)} that {task.name} needs")
            doc = {k: record[k] for k in task.fields}
            if from_hub is not None:
                doc = from_hub(doc)
            if task.keep is None or task.keep(doc):
                docs.append(doc)
    if not docs:
        raise ValueError(f"{', '.join(map(str, files))} has no documents for {task.name}")
    return docs


def build_instances(task: Task, data_dir: Path | None, num_fewshot: int | None = None,
                    limit: int | None = None) -> list[Instance]:
    """The task's first `limit` evaluation documents as lm-eval renders them with `num_fewshot` examples
    (None: the task's lm-eval default), read from `data_dir`, or from the Hub when it is None."""
    k = fewshot_count(task, num_fewshot, data_dir)
    docs = load_docs(task, split_files(task, data_dir))[:limit]
    pool = load_docs(task, split_files(task, data_dir, fewshot=True)) if k > 0 else []
    if k > len(pool):
        raise ValueError(f"{task.name}: {k} few-shot examples asked for, the few-shot split has {len(pool)}")
    # one generator per task, drawn once per document in order: what lm-eval's sampler does after set_fewshot_seed
    rnd = random.Random(FEWSHOT_SEED)
    instances = []
    for i, doc in enumerate(docs):
        shots = pool[:k] if task.sampler == "first_n" else rnd.sample(pool, k) if k else []
        context = task.description + _shots(task, shots) + task.doc_to_text(doc)
        gold, choices = task.doc_to_target(doc), task.doc_to_choice(doc)
        if not 0 <= gold < len(choices):
            raise ValueError(f"{task.name} document {i}: gold index {gold} outside the {len(choices)} choices")
        instances.append(Instance(task.name, i, context, choices, gold, task.target_delimiter))
    return instances


def _shots(task: Task, examples: list[dict]) -> str:
    return "".join(task.doc_to_text(d) + task.target_delimiter + task.doc_to_choice(d)[task.doc_to_target(d)]
                   + task.fewshot_delimiter for d in examples)


# ---- metrics (lm-eval's multiple_choice process_results + aggregation) ----

def argmax(values: list[float]) -> int:
    """Index of the largest value, the first on ties (numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def macro_f1(golds: list[int], preds: list[int]) -> float:
    """sklearn.metrics.f1_score(golds, preds, average="macro"): mean over every label seen in either list of
    2TP / (2TP + FP + FN)."""
    labels = sorted(set(golds) | set(preds))
    if not labels:
        raise ValueError("macro F1 of no documents")
    total = 0.0
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        fp = sum(g != label and p == label for g, p in zip(golds, preds))
        fn = sum(g == label and p != label for g, p in zip(golds, preds))
        total += 2 * tp / (2 * tp + fp + fn)
    return total / len(labels)


def compute_metrics(task: Task, instances: list[Instance], loglikelihoods: list[list[float]]) -> dict[str, float]:
    """The task's lm-eval metrics from each document's per-choice log-likelihoods."""
    if len(instances) != len(loglikelihoods):
        raise ValueError(f"{len(instances)} documents but {len(loglikelihoods)} sets of log-likelihoods")
    golds = [inst.gold for inst in instances]
    preds = [argmax(lls) for lls in loglikelihoods]
    out: dict[str, float] = {}
    for metric in task.metrics:
        if metric == "acc":
            out["acc"] = sum(p == g for p, g in zip(preds, golds)) / len(golds)
        elif metric == "acc_norm":
            # lm-eval normalises by len(choice) in characters, the target delimiter not counted
            norm = [argmax([ll / len(c) for ll, c in zip(lls, inst.choices)])
                    for lls, inst in zip(loglikelihoods, instances)]
            out["acc_norm"] = sum(p == g for p, g in zip(norm, golds)) / len(golds)
        elif metric == "f1":
            out["f1"] = macro_f1(golds, preds)
        else:
            raise ValueError(f"unknown metric {metric!r}")
    out["n"] = len(golds)
    return out


def aggregate(results: list[dict[str, float]]) -> dict[str, float]:
    """A group's metrics: each subtask metric weighted by its number of documents (lm-eval's weight_by_size)."""
    n = sum(r["n"] for r in results)
    metrics = [m for m in results[0] if m != "n"]
    return {**{m: sum(r[m] * r["n"] for r in results) / n for m in metrics}, "n": n}

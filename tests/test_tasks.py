"""Our tasks against lm-evaluation-harness's own task objects, built from its installed YAML with the dataset
pointed at the local files (`dataset_path: json`): same contexts, continuations, gold labels, few-shot draws,
token splits and metrics. Then the Hub: documents read from a Hugging Face cache of the Hub's parquet export equal
those read from a data dir of JSONL files."""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from elo.evaluation import tasks
from elo.evaluation.scoring import encode_pair
from elo.evaluation.tasks import TASKS, build_instances, compute_metrics, load_docs, split_files
from elo.tools.jsonl import read_jsonl
from tests.conftest import DATA, SAMPLE, write_hub_cache

# the whole benchmark data dir when ../shared is beside the repository, else the bundled KoBEST COPA sample
EVAL = DATA / "eval" if (DATA / "eval").is_dir() else SAMPLE / "eval"
LIMIT = 30  # documents per task and few-shot setting

# our task -> (lm-eval YAML under lm_eval/tasks, {HF split name: our file}); lm-eval loads every split it names, and
# KoBEST's validation split, never read (test is scored), points at the test file, which the bundled sample has too
KOBEST = {name: (f"kobest/kobest_{name}.yaml",
                 {"train": f"kobest/{name}_train.jsonl", "validation": f"kobest/{name}_test.jsonl",
                  "test": f"kobest/{name}_test.jsonl"})
          for name in ("boolq", "copa", "wic", "hellaswag", "sentineg")}
LM_EVAL_SOURCES = {
    **{f"kobest_{k}": v for k, v in KOBEST.items()},
    **{f"mmlu_{s}": (f"mmlu/default/mmlu_{s}.yaml", {"test": "mmlu/test_12subjects.jsonl",
                                                      "dev": "mmlu/dev_12subjects.jsonl"})
       for s in tasks.MMLU_SUBJECTS},
    "jcommonsenseqa": ("japanese_leaderboard/ja_leaderboard_jcommonsenseqa.yaml",
                       {"train": "jglue/jcommonsenseqa_v1.3_train.jsonl",
                        "validation": "jglue/jcommonsenseqa_v1.3_valid.jsonl"}),
    # lm-eval loads the few-shot split when it builds the task; JNLI train is absent, and at 0 shots never read
    "jnli": ("japanese_leaderboard/ja_leaderboard_jnli.yaml",
             {"train": "jglue/jnli_v1.3_valid.jsonl", "validation": "jglue/jnli_v1.3_valid.jsonl"}),
}
# few-shot settings checked per task: 0, lm-eval's default, and a k that exercises the sampler
FEWSHOT = {name: [0] if TASKS[name].fewshot_file is None else sorted({0, 3, TASKS[name].num_fewshot})
           for name in LM_EVAL_SOURCES}
FEWSHOT.update({f"mmlu_{s}": [0, 5] for s in tasks.MMLU_SUBJECTS})


def hf_records(name: str, split_file: str) -> list[dict]:
    """A split as the HF dataset lm-eval normally downloads has it: the local file with the task's fields only
    (KoBEST SentiNeg's test file also carries the un-negated originals), restricted to the MMLU subject, with JNLI's
    string labels as the ClassLabel ids of the HF JGLUE dataset."""
    with open(EVAL / split_file, encoding="utf-8") as f:
        records = [{k: r[k] for k in TASKS[name].fields} for r in map(json.loads, f)]
    if name.startswith("mmlu_"):
        records = [r for r in records if r["subject"] == name[len("mmlu_"):]]
    if name == "jnli":
        records = [{**r, "label": tasks.JNLI_LABELS.index(r["label"])} for r in records]
    return records


@pytest.fixture(scope="module")
def lm_eval_task(tmp_path_factory):
    """name, k -> lm-eval's ConfigurableTask for `name` (built once per module), its requests built for the first
    LIMIT docs with k shots and the default seed."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    built = {}

    def get(name: str, k: int):
        if not all((EVAL / f).is_file() for f in LM_EVAL_SOURCES[name][1].values()):
            pytest.skip(f"{name}: its files are not in {EVAL} (all benchmarks are in ../shared/data/eval)")
        if name not in built:
            tmp = tmp_path_factory.mktemp(name)
            yaml_file, splits = LM_EVAL_SOURCES[name]
            files = {}
            for split, rel in splits.items():
                files[split] = tmp / f"{split}.jsonl"
                files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in hf_records(name, rel)))
            cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_file)
            cfg.update(dataset_path="json", dataset_name=None,
                       dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()}, "cache_dir": str(tmp / "hf")})
            built[name] = ConfigurableTask(config=cfg)
        task = built[name]
        task.set_config(key="num_fewshot", value=k)
        task.set_fewshot_seed(1234)  # what lm_eval.evaluator does with its default fewshot_random_seed
        task.build_all_requests(limit=LIMIT)
        return task

    return get


CASES = [(name, k) for name in LM_EVAL_SOURCES for k in FEWSHOT[name]]


@pytest.mark.parametrize("name, k", CASES, ids=[f"{n}-{k}shot" for n, k in CASES])
def test_requests_match_lm_eval(name, k, lm_eval_task):
    ref = lm_eval_task(name, k)
    ours = build_instances(TASKS[name], EVAL, num_fewshot=k, limit=LIMIT)
    assert len(ours) == min(LIMIT, len(ref.eval_docs))
    assert [(i.context, c) for i in ours for c in i.continuations] == [inst.args for inst in ref.instances]
    for inst, doc in zip(ours, ref.eval_docs):
        gold, choices = ref.doc_to_target(doc), ref.doc_to_choice(doc)
        assert inst.choices == choices
        assert inst.gold == (choices.index(gold) if isinstance(gold, str) else gold)
    if k:  # few-shot examples present and, for the random sampler, different across documents
        assert ours[0].context.count(TASKS[name].fewshot_delimiter) >= k
        if TASKS[name].sampler == "random":
            assert len({i.context[:200] for i in ours}) > 1


@pytest.fixture(scope="module", params=["smollm2", "smollm2+bos"])
def tokenizers(request, tmp_path_factory, default_model_dir):
    """(elo tokenizer, lm-eval HFLM) on SmolLM2's tokenizer, and on a variant whose config adds BOS (as Llama 2's
    does), which puts BOS on every context. HFLM wraps a one-layer random model: only its tokenization is used."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    import elo

    directory = default_model_dir
    if request.param == "smollm2+bos":
        out = tmp_path_factory.mktemp("bos")
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(directory / f, out / f)
        tj = json.loads((out / "tokenizer.json").read_text())
        bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
        tj["post_processor"] = {
            "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
        (out / "tokenizer.json").write_text(json.dumps(tj))
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
        directory = out
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    lm = HFLM(pretrained=tiny, tokenizer=hf_tok, device="cpu")
    ours = elo.load_tokenizer(directory)
    assert (ours.encode("a", add_bos=True)[0] == 1) == (request.param == "smollm2+bos") == (hf_tok.encode("a")[0] == 1)
    return ours, lm


@pytest.mark.parametrize("name", list(LM_EVAL_SOURCES))
def test_token_splits_match_lm_eval(name, tokenizers, lm_eval_task):
    """lm-eval's HFLM.loglikelihood tokenization (_encode_pair: trailing context whitespace moved to the
    continuation, the whole string encoded then split) of its own requests equals ours."""
    tok, lm = tokenizers
    ref = lm_eval_task(name, max(FEWSHOT[name]))
    captured = []

    def capture(requests, **kwargs):
        captured.extend((ctx, cont) for _, ctx, cont in requests)
        return [(0.0, False)] * len(requests)

    lm._loglikelihood_tokens = capture
    lm.loglikelihood(ref.instances, disable_tqdm=True)
    ours = build_instances(TASKS[name], EVAL, num_fewshot=max(FEWSHOT[name]), limit=LIMIT)
    assert [encode_pair(tok, i.context, c) for i in ours for c in i.continuations] == captured


@pytest.mark.parametrize("name", ["kobest_hellaswag", "kobest_boolq", "mmlu_astronomy", "jnli"])
def test_metrics_match_lm_eval(name, lm_eval_task):
    """acc, acc_norm (by characters) and macro F1 from lm-eval's own process_results and aggregation."""
    ref = lm_eval_task(name, 0)
    ours = build_instances(TASKS[name], EVAL, num_fewshot=0, limit=LIMIT)
    rng = random.Random(0)
    # log-likelihoods with ties, and values where dividing by the choice length changes the winner
    lls = [[float(rng.choice([-1, -2, -3, -5.5, -8, -13])) for _ in inst.choices] for inst in ours]
    items = [ref.process_results(doc, [(ll, False) for ll in doc_lls]) for doc, doc_lls in zip(ref.eval_docs, lls)]
    agg = ref.aggregation()
    expected = {m: agg[m]([it[m] for it in items]) for m in items[0]}
    got = compute_metrics(TASKS[name], ours, lls)
    assert set(got) == set(expected) | {"n"} and got["n"] == len(ours)
    for m, v in expected.items():
        assert got[m] == pytest.approx(v, abs=1e-12), m


def test_macro_f1_reference_values():
    # hand-computed: label 0: 2TP/(2TP+FP+FN) = 2/(2+1+1) = 0.5; label 1: 4/(4+1+1) = 2/3; label 2 only predicted: 0
    assert tasks.macro_f1([0, 0, 1, 1, 1], [0, 1, 0, 1, 1]) == pytest.approx((0.5 + 2 / 3) / 2)
    assert tasks.macro_f1([0, 1], [2, 1]) == pytest.approx((0 + 1 + 0) / 3)
    assert tasks.argmax([1.0, 3.0, 3.0]) == 1  # first of equal maxima, like numpy


def test_group_is_weighted_by_size():
    out = tasks.aggregate([{"acc": 1.0, "n": 3}, {"acc": 0.0, "n": 1}])
    assert out == {"acc": 0.75, "n": 4}


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'kobest_nope'; known tasks: mmlu, kobest_boolq"):
        tasks.expand(["kobest_nope"])
    with pytest.raises(ValueError, match="MARC-ja is not available"):
        tasks.expand(["marc_ja"])
    with pytest.raises(ValueError, match="jnli needs 3 few-shot examples from a train split that the data dir"):
        build_instances(TASKS["jnli"], tmp_path)  # lm-eval's default 3-shot needs JNLI train, absent from data dirs
    with pytest.raises(FileNotFoundError, match="kobest/copa_test.jsonl not found"):
        build_instances(TASKS["kobest_copa"], tmp_path)
    bad = tmp_path / "kobest"
    bad.mkdir()
    (bad / "copa_test.jsonl").write_text('{"premise": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"copa_test.jsonl:2: malformed JSON line"):
        build_instances(TASKS["kobest_copa"], tmp_path)
    (bad / "copa_test.jsonl").write_text('{"premise": "a"}\n')
    with pytest.raises(ValueError, match="copa_test.jsonl:1: record lacks field"):
        build_instances(TASKS["kobest_copa"], tmp_path)


# ---- the Hub: a Hugging Face cache of each dataset's parquet export, offline ----

# a data dir as today's files are (our `id` fields included), a few hand-written records per split
DATA_DIR_RECORDS = {
    "kobest/copa_test.jsonl": [
        {"id": "t1", "premise": "아이가 우유를 엎질렀다.", "question": "결과", "alternative_1": "바닥이 젖었다.",
         "alternative_2": "해가 떴다.", "label": 0},
        {"id": "t2", "premise": "남자가 우산을 폈다.", "question": "원인", "alternative_1": "배가 고팠다.",
         "alternative_2": "비가 내리기 시작했다.", "label": 1},
    ],
    "kobest/copa_train.jsonl": [
        {"id": f"r{i}", "premise": f"문장 {i}.", "question": ("원인", "결과")[i % 2], "alternative_1": f"첫째 {i}.",
         "alternative_2": f"둘째 {i}.", "label": i % 2} for i in range(4)
    ],
    "mmlu/test_12subjects.jsonl": [
        {"subject": "astronomy", "question": "What is the closest star to Earth?",
         "choices": ["Proxima Centauri", "The Sun", "Sirius", "Vega"], "answer": 1},
        {"subject": "marketing", "question": "What are the 4 Ps of marketing? ",
         "choices": ["Product, price, place, promotion", "People, plan, price, pay", "A", "B"], "answer": 0},
        {"subject": "astronomy", "question": "Which planet has the most moons?",
         "choices": ["Earth", "Mars", "Venus", "Saturn"], "answer": 3},
    ],
    "mmlu/dev_12subjects.jsonl": [
        {"subject": "marketing", "question": "Branding is part of", "choices": ["HR", "product", "audit", "tax"],
         "answer": 1},
        {"subject": "astronomy", "question": "The Moon orbits", "choices": ["Mars", "the Sun", "Earth", "Venus"],
         "answer": 2},
    ],
    "jglue/jcommonsenseqa_v1.3_valid.jsonl": [
        {"q_id": 8939, "question": "電子機器で使用される最も主要な電子回路基板の事をなんと言う？", "choice0": "掲示板",
         "choice1": "パソコン", "choice2": "マザーボード", "choice3": "ハードディスク", "choice4": "まな板", "label": 2},
    ],
    "jglue/jcommonsenseqa_v1.3_train.jsonl": [
        {"q_id": i, "question": f"質問{i}？", **{f"choice{c}": f"選択{i}-{c}" for c in range(5)}, "label": i % 5}
        for i in range(4)
    ],
    "jglue/jnli_v1.3_valid.jsonl": [
        {"sentence_pair_id": "0", "yjcaptions_id": "100124-104404-104405", "sentence1": "二人の男性がジャンボジェット機を見ています。",
         "sentence2": "2人の男性が、白い飛行機を眺めています。", "label": "neutral"},
        {"sentence_pair_id": "1", "yjcaptions_id": "100124-104405-104404", "sentence1": "2人の男性が、白い飛行機を眺めています。",
         "sentence2": "二人の男性がジャンボジェット機を見ています。", "label": "entailment"},
    ],
}
# task -> few-shot examples the comparison draws (from the data dir: JNLI has no train there)
COMPARED = {"kobest_copa": 3, "mmlu_astronomy": 1, "mmlu_marketing": 1, "jcommonsenseqa": 3, "jnli": 0}


def as_on_the_hub(name: str, record: dict) -> dict:
    """A data dir record as the Hub's parquet export has it: KoBEST without our `id` field, JNLI's label as the
    ClassLabel id of the HF JGLUE dataset (MMLU and JCommonsenseQA records are the Hub's rows unchanged)."""
    if name.startswith("kobest_"):
        return {k: v for k, v in record.items() if k != "id"}
    if name == "jnli":
        return {**record, "label": tasks.JNLI_LABELS.index(record["label"])}
    return record


def cache_as_on_the_hub(cache: Path, data_dir_records: dict[str, list[dict]], names: list[str]) -> None:
    """The tasks' splits, made from data dir records, into a Hub-layout cache (MMLU: one config per subject)."""
    for name in names:
        task = TASKS[name]
        splits = {task.hub.eval_split: task.eval_file, task.hub.fewshot_split: task.fewshot_file}
        write_hub_cache(cache, task.hub.dataset, {
            f"{task.hub.config}/{split}/0000.parquet":
                [as_on_the_hub(name, r) for r in data_dir_records[file] if task.keep is None or task.keep(r)]
            for split, file in splits.items() if file in data_dir_records})


@pytest.mark.parametrize("name", list(TASKS))
def test_hub_source_is_lm_evals(name):
    """Every task reads the dataset, config and splits lm-eval's YAML names (JGLUE: the stand-in for Rakuten/JGLUE)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_SOURCES[name][0])
    hub = TASKS[name].hub
    assert {"Rakuten/JGLUE": tasks.JGLUE}.get(cfg["dataset_path"], cfg["dataset_path"]) == hub.dataset
    assert cfg["dataset_name"] == hub.config
    assert (cfg.get("test_split") or cfg["validation_split"]) == hub.eval_split
    assert (cfg.get("fewshot_split") or cfg["training_split"]) == hub.fewshot_split


def test_hub_documents_equal_the_data_dirs(offline_hub, tmp_path):
    data_dir = tmp_path / "eval"
    for file, records in DATA_DIR_RECORDS.items():
        (data_dir / file).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    cache_as_on_the_hub(offline_hub, DATA_DIR_RECORDS, list(COMPARED))
    for name, k in COMPARED.items():
        task = TASKS[name]
        assert all(offline_hub in f.parents for f in tasks.data_files(task, None, k))
        for fewshot in (False, True) if k else (False,):
            hub_docs = load_docs(task, split_files(task, None, fewshot))
            assert hub_docs == load_docs(task, split_files(task, data_dir, fewshot)) and hub_docs, (name, fewshot)
        assert build_instances(task, None, k) == build_instances(task, data_dir, k), name


@pytest.mark.skipif(not (DATA / "eval").is_dir(), reason="../shared/data/eval (all benchmark files) is not present")
@pytest.mark.parametrize("name", ["kobest_copa", "mmlu_astronomy", "jcommonsenseqa", "jnli"])
def test_hub_documents_equal_the_shared_files(name, offline_hub):
    """The same on every record of the shared benchmark files, converted to the Hub's columns."""
    task = TASKS[name]
    files = [f for f in (task.eval_file, task.fewshot_file) if f is not None]
    records = {f: [r for _, r in read_jsonl(DATA / "eval" / f)] for f in files}
    cache_as_on_the_hub(offline_hub, records, [name])
    for fewshot in (False, True) if task.fewshot_file else (False,):
        hub_docs = load_docs(task, split_files(task, None, fewshot))
        assert hub_docs == load_docs(task, split_files(task, DATA / "eval", fewshot)), fewshot


def test_jnli_draws_its_few_shot_examples_from_the_hubs_train_split(offline_hub):
    jnli = DATA_DIR_RECORDS["jglue/jnli_v1.3_valid.jsonl"]
    rows = [as_on_the_hub("jnli", r) for r in jnli] * 2
    write_hub_cache(offline_hub, tasks.JGLUE, {f"JNLI/{split}/0000.parquet": rows for split in ("validation", "train")})
    instances = build_instances(TASKS["jnli"], None)  # lm-eval's default: 3 shots
    assert instances[0].context.count("### 応答：") == 4


def test_hub_errors_are_one_line_and_name_the_dataset(offline_hub, monkeypatch):
    copa = TASKS["kobest_copa"]
    with pytest.raises(FileNotFoundError) as e:
        split_files(copa, None)  # offline, and nothing cached
    message = str(e.value)
    assert message.startswith("Hub dataset skt/kobest_v1 (copa/test/*.parquet at refs/convert/parquet) is not in the "
                              "Hugging Face cache") and "pass --data-dir DIR" in message and "\n" not in message
    write_hub_cache(offline_hub, tasks.KOBEST, {"copa/test/0000.parquet": [{"premise": "a", "label": 0}]})
    with pytest.raises(ValueError, match=r"0000.parquet row 0: record lacks field\(s\) question, alternative_1"):
        load_docs(copa, split_files(copa, None))
    with pytest.raises(FileNotFoundError, match="Hub dataset skt/kobest_v1 has no files copa/train/"):
        split_files(copa, None, fewshot=True)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if the hub extra were not installed
    with pytest.raises(ValueError, match=r'needs pyarrow; install it with pip install -e "\.\[hub\]"'):
        split_files(copa, None)

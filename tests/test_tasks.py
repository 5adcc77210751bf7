"""Our tasks against lm-evaluation-harness's own task objects, built from its installed YAML with the dataset
pointed at the local files (`dataset_path: json`): same contexts, continuations, gold labels, few-shot draws,
token splits and metrics."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from elo.evaluation import tasks
from elo.evaluation.scoring import encode_pair
from elo.evaluation.tasks import TASKS, build_instances, compute_metrics
from tests.conftest import DATA

EVAL = DATA / "eval"
LIMIT = 30  # documents per task and few-shot setting
pytestmark = pytest.mark.skipif(not EVAL.is_dir(), reason=f"shared eval data not found under {EVAL}")

# our task -> (lm-eval YAML under lm_eval/tasks, {HF split name: our file})
KOBEST = {name: (f"kobest/kobest_{name}.yaml",
                 {"train": f"kobest/{name}_train.jsonl", "validation": f"kobest/{name}_dev.jsonl",
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
def tokenizers(request, tmp_path_factory):
    """(elo tokenizer, lm-eval HFLM) on SmolLM2's tokenizer, and on a variant whose config adds BOS (as Llama 2's
    does), which puts BOS on every context. HFLM wraps a one-layer random model: only its tokenization is used."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    import elo

    directory = elo.resolve(elo.DEFAULT_MODEL)
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
    with pytest.raises(ValueError, match="MARC-ja is not in the data dir"):
        tasks.expand(["marc_ja"])
    with pytest.raises(ValueError, match="jnli needs 3 few-shot examples"):
        build_instances(TASKS["jnli"], EVAL)  # lm-eval's default 3-shot needs JNLI train, which is absent
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

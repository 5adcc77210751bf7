"""elo.evaluation.generate: KV-cache decoding equals full recomputation; stopping, limits, sampling; benchmark answer files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import elo.evaluation.generate as gen
from elo.config import ModelConfig
from elo.evaluation.generate import (chat_stop_ids, generate, generate_answers, generate_batch, load_questions,
                          read_records)
from elo.model import Transformer

EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
needs_data = pytest.mark.skipif(not EVAL.is_dir(), reason="shared/data/eval not found beside the repo")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 256 + len(SPECIALS)  # bytes, then the special tokens
ARCHS = {  # Llama; Mistral with a sliding window shorter than the prompts; Qwen2 with biases and a tied head
    "llama": dict(architectures=["LlamaForCausalLM"]),
    "mistral": dict(architectures=["MistralForCausalLM"], sliding_window=8),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=8, max_window_layers=1),
}


def tiny_model(arch: str = "llama", context: int = 4096, seed: int = 0) -> Transformer:
    config = ModelConfig.from_hf(dict(ARCHS[arch], vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=context, eos_token_id=256 + 2))
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():  # larger weights than the default init: varied, confident next-token choices
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1 if p.dim() == 1 else 0.3)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # one token at a time through tiny models: a second thread only adds synchronisation (and, on a busy machine,
    # long waits for it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.inference_mode()
def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The reference: the whole sequence recomputed for every new token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 99], list(range(40, 63)), [200, 3, 3, 3, 150, 77, 12, 9, 250, 1, 2]]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kv_cache_matches_full_recompute(arch, monkeypatch):
    monkeypatch.setattr(gen, "PREFILL_TOKENS", 5)  # several prefill chunks, crossing the sliding window
    model = tiny_model(arch)
    for prompt in PROMPTS:
        want = greedy_without_cache(model, prompt, 24)
        assert len(set(want)) > 3, "the reference should not be a single repeated token"
        assert generate(model, prompt, 24, stop_ids=set()) == want


@pytest.mark.slow
def test_kv_cache_matches_full_recompute_on_the_default_model(default_model_dir):
    from elo.data.chat_templates import render_chat
    from elo.hf.checkpoint import load_model
    from elo.hf.tokenizer import load_tokenizer

    model, tokenizer = load_model(default_model_dir), load_tokenizer(default_model_dir)
    for question in ("What is the capital of France?", "한국의 수도는 어디인가요?"):
        prompt = tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": question}]))
        assert generate(model, prompt, 8, stop_ids=set()) == greedy_without_cache(model, prompt, 8)


# prompts of mixed lengths: shorter and longer than the sliding window, than each other and than the prefill chunk
MIXED = [PROMPTS[1], [7], PROMPTS[0], list(range(100, 140)), PROMPTS[2], [42, 42]]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_greedy_equals_one_at_a_time(arch, monkeypatch):
    monkeypatch.setattr(gen, "PREFILL_TOKENS", 30)  # 5 tokens per row per prefill pass: several chunks
    model = tiny_model(arch)
    alone = [generate(model, p, 24, stop_ids=set()) for p in MIXED]
    assert alone == [greedy_without_cache(model, p, 24) for p in MIXED]
    assert generate_batch(model, MIXED, 24, stop_ids=set()) == alone
    # prompts of one length take the other prefill path (the last token prefilled with the rest)
    same_length = [MIXED[3], MIXED[3][::-1]]
    assert generate_batch(model, same_length, 24, set()) == [alone[3], generate(model, same_length[1], 24, set())]


def batch_sizes(model: Transformer) -> list[int]:
    """Rows of every forward pass the model makes from now on."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def test_rows_stop_on_their_own_and_leave_the_batch():
    model = tiny_model("mistral")
    full = [greedy_without_cache(model, p, 24) for p in MIXED]
    stop = full[0][5]  # row 0 stops at its own stop id, which the others do not stop at
    limits = [24, 3, 24, 10, 1, 24]
    sizes = batch_sizes(model)
    out = generate_batch(model, MIXED, limits, [{stop}] + [set()] * 5)
    assert out[0] == full[0][:full[0].index(stop)] and len(out[0]) <= 5
    assert out[1:] == [f[:n] for f, n in zip(full[1:], limits[1:])]
    decode = sizes[-24:]  # one pass per new token of the longest row, after the prefill
    assert decode[0] == 6 and decode[-1] == 2 and decode == sorted(decode, reverse=True)


def test_sampling_is_seeded_per_row_whatever_the_batch_holds():
    model = tiny_model()
    kwargs = dict(temperature=1.5, top_p=0.9)
    alone = [generate(model, p, 20, set(), seed=s, **kwargs) for p, s in zip(MIXED, range(6))]
    assert generate_batch(model, MIXED, 20, set(), seeds=range(6), **kwargs) == alone
    # the same row between other neighbours, in another position, with a neighbour that stops at once
    assert generate_batch(model, [MIXED[4], MIXED[2], MIXED[3]], [20, 20, 1], set(), seeds=[4, 2, 99],
                          **kwargs)[:2] == [alone[4], alone[2]]
    assert alone[0] != generate(model, MIXED[0], 20, set(), seed=6, **kwargs)
    with pytest.raises(ValueError, match="seeds has 2 entries for 6 prompts"):
        generate_batch(model, MIXED, 20, set(), seeds=[1, 2], **kwargs)


@pytest.mark.slow
def test_batched_greedy_on_the_default_model_equals_transformers_generate(default_model_dir):
    from transformers import AutoModelForCausalLM

    from elo.data.chat_templates import render_chat
    from elo.hf.checkpoint import load_model
    from elo.hf.tokenizer import load_tokenizer

    directory = default_model_dir
    model, tokenizer = load_model(directory), load_tokenizer(directory)
    chats = [[{"role": "user", "content": "Explain why the sky is blue."}],
             [{"role": "user", "content": "한국의 수도는 어디인가요? 설명해 주세요."}],
             [{"role": "system", "content": "You are a poet."},
              {"role": "user", "content": "Write two lines about the sea, then explain the rhyme you chose."}],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Describe it in a few sentences."}]]
    prompts = [tokenizer.encode(render_chat(tokenizer, chat)) for chat in chats]
    assert len({len(p) for p in prompts}) == 4
    stop = chat_stop_ids(model, tokenizer)
    batched = generate_batch(model, prompts, 24, stop)
    assert batched == [generate(model, p, 24, stop) for p in prompts]
    assert sum(map(len, batched)) > 60  # most answers run to the limit: the comparison covers many tokens
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for prompt, ours in zip(prompts, batched):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(stop),
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == want[:len(ours)] and (len(ours) == 24 or want[len(ours)] in stop)


def test_stops_at_a_stop_token_and_leaves_it_out():
    model = tiny_model()
    full = greedy_without_cache(model, PROMPTS[1], 24)
    stop = full[7]
    first = full.index(stop)
    assert generate(model, PROMPTS[1], 24, stop_ids={stop, 10**6}) == full[:first]
    assert generate(model, PROMPTS[1], 24, stop_ids={full[0]}) == []


def test_max_new_tokens():
    model = tiny_model()
    assert len(generate(model, PROMPTS[0], 9, stop_ids=set())) == 9
    assert generate(model, PROMPTS[0], 0, stop_ids=set()) == []
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, PROMPTS[0], -1, stop_ids=set())


def test_context_limit_truncates_the_prompt_from_the_left():
    model = tiny_model(context=32)
    prompt = list(range(1, 41))  # 40 tokens: with 10 new ones only the last 22 fit
    with pytest.warns(UserWarning, match="keeping the last 22 prompt tokens"):
        out = generate(model, prompt, 10, stop_ids=set())
    assert out == greedy_without_cache(model, prompt[-22:], 10)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        generate(model, prompt, 32, stop_ids=set())


def test_sampling():
    model = tiny_model()
    a = generate(model, PROMPTS[1], 20, set(), temperature=1.5, seed=3)
    assert a == generate(model, PROMPTS[1], 20, set(), temperature=1.5, seed=3)  # seeded: reproducible
    assert a != generate(model, PROMPTS[1], 20, set(), temperature=1.5, seed=4)
    assert a != greedy_without_cache(model, PROMPTS[1], 20)
    # a nucleus too small for anything but the most likely token is greedy decoding
    assert generate(model, PROMPTS[1], 20, set(), temperature=1.5, top_p=1e-6, seed=3) == \
        greedy_without_cache(model, PROMPTS[1], 20)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS[1], 5, set(), temperature=1.0, top_p=0.0)


class ByteTokenizer:
    """Bytes plus ChatML special tokens, with SmolLM2's chat template: enough of elo.hf.tokenizer for chat decoding."""

    chat_template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
                     "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                     "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                     "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                     "{% endif %}")
    special_tokens = {s: 256 + i for i, s in enumerate(SPECIALS)}
    bos_id, eos_id = 257, 258

    def __init__(self):
        self.prompts: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.prompts.append(text)
        ids = []
        for piece in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
            ids += [self.special_tokens[piece]] if piece in self.special_tokens else list(piece.encode())
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


@needs_data
@pytest.mark.parametrize("bench,count", [("mt_bench", 80), ("mt_bench_ja", 80), ("logickor", 42)])
def test_answers_for_every_question(bench, count, tmp_path, monkeypatch):
    prompts = []  # the model is stubbed out here: this is about the questions, the chat turns and the file format
    monkeypatch.setattr(gen, "generate_batch", lambda model, batch, *a, **k: [prompts.append(ids) or list(b" ok ")
                                                                              for ids in batch])
    model, tokenizer = tiny_model(), ByteTokenizer()
    out = generate_answers(model, tokenizer, bench, EVAL, tmp_path / "answers.jsonl", max_new_tokens=3,
                           model_id="tiny")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    questions = load_questions(bench, EVAL)
    assert len(records) == len(questions) == count and len(prompts) == 2 * count
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
    for r in records:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and r["model_id"] == "tiny"
        assert r["choices"] == [{"index": 0, "turns": ["ok", "ok"]}]
    # turn 2 is asked with turn 1 and its answer in the conversation, under the chat template
    q = questions[-1]
    second = tokenizer.prompts[-1]
    assert prompts[-1] == ByteTokenizer().encode(second)
    assert second == (f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      f"<|im_end|>\n<|im_start|>user\n{q['turns'][0]}<|im_end|>\n<|im_start|>assistant\nok"
                      f"<|im_end|>\n<|im_start|>user\n{q['turns'][1]}<|im_end|>\n<|im_start|>assistant\n")


def test_answer_text_is_the_decoded_greedy_continuation(tmp_path):
    data = tmp_path / "eval"
    (data / "mt_bench").mkdir(parents=True)
    (data / "mt_bench" / "question.jsonl").write_text(json.dumps(
        {"question_id": 1, "category": "writing", "turns": ["Hi", "Again"]}) + "\n")
    model, tokenizer = tiny_model(), ByteTokenizer()
    out = generate_answers(model, tokenizer, "mt_bench", data, tmp_path / "a.jsonl", max_new_tokens=6)
    first = json.loads(out.read_text())["choices"][0]["turns"][0]
    prompt = ByteTokenizer().encode(tokenizer.prompts[0])
    ids = generate(model, prompt, 6, {256, 258})
    assert first == tokenizer.decode([i for i in ids if i < 256]).strip()


def test_batched_answers_equal_one_at_a_time(tmp_path):
    data = tmp_path / "eval"
    (data / "mt_bench").mkdir(parents=True)
    turns = [["Hi", "Again"], ["A longer first question?", "ok"], ["x", "And a longer second turn, please."],
             ["Tell me more.", "Why?"], ["Five", "5"]]
    (data / "mt_bench" / "question.jsonl").write_text("".join(json.dumps(
        {"question_id": n, "category": "writing", "turns": t}) + "\n" for n, t in enumerate(turns)))
    model = tiny_model("mistral")
    one, batched = (generate_answers(model, ByteTokenizer(), "mt_bench", data, tmp_path / f"{b}.jsonl",
                                     max_new_tokens=12, batch_size=b) for b in (1, 3))
    records = [[(r["question_id"], r["choices"]) for r in read_records(path)] for path in (one, batched)]
    assert records[0] == records[1] and len(records[0]) == 5
    assert len({r[1][0]["turns"][1] for r in records[0]}) > 1  # varied answers, not one repeated string
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_answers(model, ByteTokenizer(), "mt_bench", data, tmp_path / "x.jsonl", batch_size=0)


@needs_data
@pytest.mark.parametrize("batch_size", [1, 4])
def test_resume_skips_answered_questions_and_repairs_a_cut_line(batch_size, tmp_path, monkeypatch):
    model, tokenizer = tiny_model(), ByteTokenizer()
    path = tmp_path / "answers.jsonl"
    questions = load_questions("logickor", EVAL)
    done = [{"question_id": q["question_id"], "answer_id": "x", "model_id": "tiny", "tstamp": 0.0,
             "choices": [{"index": 0, "turns": ["a", "b"]}]} for q in questions[:5]]
    # five finished answers, then a line cut off mid-write by a crash
    path.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"question_id": 6, "answ')
    calls = []
    monkeypatch.setattr(gen, "generate_batch", lambda model, batch, *a, **k: [calls.append(1) or [104, 105]
                                                                              for _ in batch])
    with pytest.warns(UserWarning, match="truncated last line"):
        generate_answers(model, tokenizer, "logickor", EVAL, path, max_new_tokens=2, model_id="tiny",
                         batch_size=batch_size)
    records = read_records(path)
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
    assert records[:5] == done and records[5]["choices"][0]["turns"] == ["hi", "hi"]
    assert len(calls) == 2 * (len(questions) - 5)
    generate_answers(model, tokenizer, "logickor", EVAL, path, max_new_tokens=2, model_id="tiny")
    assert len(calls) == 2 * (len(questions) - 5) and len(read_records(path)) == len(questions)  # nothing left
    with pytest.raises(ValueError, match="one model per answer file"):
        generate_answers(model, tokenizer, "logickor", EVAL, path, max_new_tokens=2, model_id="other")


def test_bad_bench_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="unknown bench 'mt-bench'"):
        load_questions("mt-bench", tmp_path)
    with pytest.raises(FileNotFoundError, match="shared/data/eval"):
        load_questions("logickor", tmp_path)


def test_limit_answers_only_the_first_questions_with_progress(tmp_path, capsys):
    data = tmp_path / "eval"
    (data / "mt_bench").mkdir(parents=True)
    (data / "mt_bench" / "question.jsonl").write_text("".join(json.dumps(
        {"question_id": n, "category": "writing", "turns": [f"Q{n}", "And?"]}) + "\n" for n in range(5)))
    out = generate_answers(tiny_model(), ByteTokenizer(), "mt_bench", data, tmp_path / "a.jsonl", max_new_tokens=2,
                           limit=2)
    assert [r["question_id"] for r in read_records(out)] == [0, 1]
    assert "mt_bench: 2/2 questions answered" in capsys.readouterr().err

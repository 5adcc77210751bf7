"""elo.data.chat_data: chat files, truncation, the assistant-only loss against transformers, isolation of rows, the
conversation mix, ranks and resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import elo
from elo.data.chat_templates import tokenize_chats
from elo.data.chat_data import ChatSet, ChatSource, LENGTH_GROUP, build_chat_source, pack, read_chats
from elo.hf.tokenizer import load_tokenizer
from tests.conftest import SAMPLE


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def sharegpt(*turns):
    names = {"s": "system", "u": "human", "a": "gpt"}
    return {"conversations": [{"from": names[r], "value": v} for r, v in turns]}


def openai(*turns):
    names = {"s": "system", "u": "user", "a": "assistant"}
    return {"messages": [{"role": names[r], "content": v} for r, v in turns]}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


# ---- reading ----

def test_both_forms_read_alike(tmp_path):
    turns = [("s", "Be brief."), ("u", "Hi"), ("a", "Hello"), ("u", "Bye?")]
    a = read_chats(write_jsonl(tmp_path / "a.jsonl", [sharegpt(*turns)]))
    b = read_chats(write_jsonl(tmp_path / "b.jsonl", [openai(*turns)]))
    assert a == b == [(1, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}])]  # the unanswered last turn is dropped


@pytest.mark.parametrize("record,message", [
    (sharegpt(("u", "q"), ("a", "x")) | {"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    ({"conversations": []}, "empty conversation"),
    (sharegpt(("u", "q"), ("u", "q2"), ("a", "x")), "roles do not alternate"),
    (sharegpt(("a", "x"), ("u", "q")), "roles do not alternate"),
    (sharegpt(("u", "q"), ("s", "late system"), ("a", "x")), "roles do not alternate"),
    (sharegpt(("s", "sys"), ("u", "q")), "no assistant turn"),
    (openai(("u", "q"), ("a", "x")), "no 'conversations' list"),
    ({"conversations": [{"from": "human", "value": 3}]}, "turn 0 has no string 'value'"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "chats.jsonl", [sharegpt(("u", "fine"), ("a", "ok")), record])
    with pytest.raises(ValueError) as err:
        read_chats(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_template_refusal_names_file_and_line(tmp_path, default_model_dir):
    from tests.test_chat import MISTRAL_V01

    tokenizer = load_tokenizer(default_model_dir)  # a fresh one: its template is replaced
    tokenizer.chat_template = MISTRAL_V01  # no system role
    path = write_jsonl(tmp_path / "c.jsonl", [sharegpt(("u", "q"), ("a", "x")), sharegpt(("s", "s"), ("u", "q"),
                                                                                          ("a", "x"))])
    with pytest.raises(ValueError, match=f"^{path}:2: mistral-v0.1 chat template: roles must alternate"):
        build_chat_source({"en": [path]}, tokenizer, 64, None, 0, val_conversations=0)


# ---- truncation ----

def test_long_conversations_keep_whole_turns_or_are_skipped(tmp_path, tokenizer):
    long = "word " * 40
    records = [
        sharegpt(("u", "short"), ("a", "fits")),  # whole
        sharegpt(("u", "q1"), ("a", "a1"), ("u", "q2"), ("a", long)),  # keeps the first exchange
        sharegpt(("u", "q"), ("a", long)),  # first answer too long: skipped
        sharegpt(("u", "q3"), ("a", "a3")),
    ]
    path = write_jsonl(tmp_path / "en.jsonl", records)
    source, info = build_chat_source({"en": [path]}, tokenizer, 48, None, 0, val_conversations=1)
    i = info["en"]
    assert (i.conversations, i.whole, i.truncated, i.skipped, i.unaligned, i.train, i.val) == (4, 2, 1, 1, 0, 2, 1)
    kept = [source.train["en"][k] for k in range(2)] + [source.val["en"][0]]
    truncated = tokenize_chats(tokenizer, [read_chats(path)[1][1][:2]])[0]
    assert any(list(ids) == truncated[0] and list(flags) == truncated[1] for ids, flags in kept)
    assert all(len(ids) <= 49 for ids, _ in kept)


# ---- batches: the loss and isolation ----

@pytest.fixture(scope="module")
def chat_model(tiny_with_tokenizer, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and chat template, its weights spread (perturb_) so that token
    losses differ from token to token and a wrong mask would move the mean loss."""
    import shutil

    import transformers

    from tests.conftest import perturb_

    directory = tmp_path_factory.mktemp("chat-model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer)
    perturb_(hf)
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_with_tokenizer / name, directory / name)
    return directory, elo.load_model(directory).eval()


CONVERSATIONS = [
    [("u", "What is the capital of France?"), ("a", "Paris.")],
    [("s", "You are terse."), ("u", "2+2?"), ("a", "4"), ("u", "And 3+3?"), ("a", "6, of course.")],
    [("u", "한국어로 인사해 주세요."), ("a", "안녕하세요! 반갑습니다.")],
    [("u", "Say a long sentence."), ("a", "This sentence is a good deal longer than the other answers here.")],
]


def examples(tokenizer, conversations):
    messages = [[{"role": {"s": "system", "u": "user", "a": "assistant"}[r], "content": c} for r, c in conv]
                for conv in conversations]
    return [(np.array(ids), np.array(flags)) for ids, flags in tokenize_chats(tokenizer, messages)]


def test_loss_equals_transformers_with_ignored_labels(chat_model):
    import transformers

    directory, model = chat_model
    tokenizer = load_tokenizer(directory)
    batch = pack(examples(tokenizer, CONVERSATIONS), ["en"] * 4)
    assert batch.inputs.shape[0] == 1 and len(batch.documents) == 4  # one row, no padding
    with torch.no_grad():
        total, _ = model(batch.inputs, targets=batch.targets, documents=batch.documents)
    ours = total.item() / (batch.targets >= 0).sum().item()

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    # the reference sees whole conversations, one padded row each, labels -100 where not trained; transformers
    # shifts them itself
    convs = examples(tokenizer, CONVERSATIONS)
    lengths = [len(ids) for ids, _ in convs]
    assert len(set(lengths)) == 4  # every row but the longest is padded
    real = torch.zeros(4, max(lengths), dtype=torch.long)
    labels = torch.full_like(real, -100)
    attention = torch.zeros_like(real)
    for row, (ids, flags) in enumerate(convs):
        real[row, :len(ids)] = torch.from_numpy(ids)
        labels[row, :len(ids)] = torch.from_numpy(np.where(flags, ids, -100))
        attention[row, :len(ids)] = 1
    with torch.no_grad():
        reference = hf(input_ids=real, attention_mask=attention, labels=labels).loss.item()
    assert abs(ours - reference) <= 1e-5, (ours, reference)
    # sensitivity: the same loss with every assistant token's label one position late is far off
    late = labels.clone()
    late[:, 1:] = labels[:, :-1]
    with torch.no_grad():
        shifted = hf(input_ids=real, attention_mask=attention, labels=late).loss.item()
    assert abs(shifted - reference) > 1e-2


def test_packed_logits_equal_each_conversation_alone(chat_model):
    """Packing is exact: each conversation's logits in the packed row equal its logits computed alone (<= 1e-5),
    and changing one conversation changes no other's."""
    directory, model = chat_model
    tokenizer = load_tokenizer(directory)
    convs = examples(tokenizer, CONVERSATIONS)
    with torch.no_grad():
        packed = pack(convs, ["en"] * 4)
        logits = model(packed.inputs, documents=packed.documents)[0].split(packed.documents)
        for (ids, _), got in zip(convs, logits):
            alone = model(torch.from_numpy(ids[:-1]).long()[None])[0]
            assert got.shape == alone.shape and torch.allclose(got, alone, atol=1e-5, rtol=0)
        changed = CONVERSATIONS[:2] + [[("u", "Something else entirely, and longer than before: tell me a story."),
                                        ("a", "Once upon a time there was a very long answer. " * 4)]]
        other = pack(examples(tokenizer, changed), ["en"] * 3)
        other_logits = model(other.inputs, documents=other.documents)[0].split(other.documents)
    for row in range(2):
        assert torch.allclose(other_logits[row], logits[row], atol=1e-5, rtol=0)
    assert other_logits[2].shape != logits[2].shape  # the changed conversation did change
    with pytest.raises(ValueError, match="must cover one row"):
        model(packed.inputs, documents=packed.documents[:-1])


# ---- the stream: mix, ranks, resume ----

def synthetic(sizes: dict[str, int], seed: int = 0) -> dict[str, ChatSet]:
    """Conversation k of language j: ids [1000 * j + k, ...] with a varying length, all tokens trained."""
    rng = np.random.default_rng(seed)
    out = {}
    for j, (lang, n) in enumerate(sorted(sizes.items())):
        rows = [[1000 * j + k] + [7] * int(rng.integers(2, 40)) for k in range(n)]
        out[lang] = ChatSet.of([(ids, [True] * len(ids)) for ids in rows])
    return out


def source(sizes, mix=None, seed=0, rank=0, world=1) -> ChatSource:
    train = synthetic(sizes)
    mix = mix or dict.fromkeys(sizes, 1.0)
    return ChatSource(train, synthetic({l: 3 for l in sizes}, 1), mix, seed, rank=rank, world_size=world)


def ids_of(batch) -> list[int]:
    """The first token of each packed conversation (its identity in `synthetic`)."""
    starts = np.cumsum([0] + batch.documents[:-1])
    return batch.inputs[0, starts].tolist()


@pytest.mark.parametrize("mix", [None, {"en": 1.0, "ko": 3.0}])
def test_mix_within_one_conversation_at_every_prefix(mix):
    s = source({"en": 37, "ko": 600}, mix)
    share = {l: w / sum((mix or {"en": 1, "ko": 1}).values()) for l, w in (mix or {"en": 1, "ko": 1}).items()}
    counts = {"en": 0, "ko": 0}
    for n in range(1, 1001):
        counts[s.next_batch(1).langs[0]] += 1
        assert max(abs(counts[l] - n * share[l]) for l in counts) < 1, (n, counts)


def test_an_epoch_visits_every_conversation_once_in_length_groups():
    s = source({"en": 2 * LENGTH_GROUP + 50, "ko": 10})
    en = []
    while len(en) < 2 * (2 * LENGTH_GROUP + 50):
        b = s.next_batch(1)
        if b.langs[0] == "en":
            en.append((b.inputs[0, 0].item(), b.documents[0]))
    n = 2 * LENGTH_GROUP + 50
    for epoch in (en[:n], en[n:]):
        assert sorted(i for i, _ in epoch) == list(range(n))
        for g in range(0, n, LENGTH_GROUP):  # each group is drawn shortest first
            lengths = [w for _, w in epoch[g:g + LENGTH_GROUP]]
            assert lengths == sorted(lengths)
    assert [i for i, _ in en[:n]] != [i for i, _ in en[n:]]  # a new order every epoch


def test_two_ranks_see_together_what_one_process_sees():
    single = source({"en": 50, "ko": 80})
    ranks = [source({"en": 50, "ko": 80}, rank=r, world=2) for r in range(2)]
    for _ in range(40):
        whole = single.next_batch(6)
        parts = [r.next_batch(3) for r in ranks]
        assert sorted(ids_of(whole)) == sorted(ids_of(parts[0]) + ids_of(parts[1]))
        # each rank packs its own conversations; together they hold exactly the whole batch's tokens
        assert sum(p.inputs.shape[1] for p in parts) == whole.inputs.shape[1]
    assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_resume_is_exact():
    a = source({"en": 50, "ko": 80}, seed=3)
    for _ in range(17):
        a.next_batch(5)
    state = json.loads(json.dumps(a.state_dict()))
    b = source({"en": 50, "ko": 80}, seed=3)
    b.load_state_dict(state)
    for _ in range(30):
        x, y = a.next_batch(5), b.next_batch(5)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets) and x.langs == y.langs
    with pytest.raises(ValueError, match="seed"):
        source({"en": 50, "ko": 80}, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="train_conversations"):
        source({"en": 51, "ko": 80}, seed=3).load_state_dict(state)


def test_val_batches_cover_the_held_out_set():
    s = source({"en": 20, "ko": 20})
    rows = [r for b in s.val_batches("ko", 2) for r in ids_of(b)]
    assert len(rows) == 3
    with pytest.raises(ValueError, match="no validation data for language 'ja'"):
        next(s.val_batches("ja", 2))


def test_build_on_the_bundled_chats_mixes_korean_and_english_one_to_one(tokenizer):
    sft = SAMPLE / "sft"
    source, info = build_chat_source({"ko": [sft / "ko_chatbot_data.jsonl"],
                                      "en": [sft / "en_self_instruct_seed_tasks.jsonl"]}, tokenizer, 512, None, 0)
    assert info["ko"].conversations == 296 and info["en"].conversations == 175
    assert info["ko"].unaligned == info["en"].unaligned == 0
    batch = source.next_batch(8)
    assert sorted(batch.langs) == ["en"] * 4 + ["ko"] * 4
    answer = tokenizer.decode([t for t in batch.targets[0].tolist() if t >= 0])
    assert answer.endswith("<|im_end|>") and "<|im_start|>" not in answer

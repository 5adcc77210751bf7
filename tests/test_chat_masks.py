"""SFT masks by construction (elo.data.chat_templates.tokenize_chats), for every supported chat template: the ids equal
transformers' apply_chat_template(tokenize=True) on the same conversation, and the trained tokens decode to exactly
the assistant contents, each followed by its end-of-turn token (headers, system and user turns untrained).

Each template is paired with SmolLM2's real byte-level BPE plus the template's special tokens, so the reference is
transformers' jinja rendering tokenized by HF `tokenizers`."""
from __future__ import annotations

import json
import shutil

import pytest

from elo.data.chat_templates import tokenize_chats
from elo.hf.tokenizer import load_tokenizer
from tests.test_chat import SYSTEM, TEMPLATES
from tests.test_tokenizer import corpus, spm_dir  # noqa: F401 (fixtures)

FAMILY_TOKENS = {"llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "mistral-v0.3": ["[INST]", "[/INST]"]}  # besides BOS and EOS
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>"}  # else the EOS token
STRIPPED = {"llama3", "llama3.1", "mistral-v0.3"}  # templates that trim the assistant's content
LEAD = {"mistral-2024": " ", "mistral-v0.3": " "}  # "[/INST] answer": the space is generated, so trained

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}],
    "multi-turn": [
        {"role": "user", "content": "  Name a colour.\n"},
        {"role": "assistant", "content": "Blue.  \n"},
        {"role": "user", "content": "한국어로 다시 말해 주세요."},
        {"role": "assistant", "content": "파란색입니다. 日本語では「青」です。"},
    ],
    "system+multi-turn": [
        SYSTEM,
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer, with a list:\n1. one\n2. two"},
        {"role": "user", "content": "Second question?"},
        {"role": "assistant", "content": " Second answer. "},
    ],
    "empty-answer": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
}


@pytest.fixture(scope="module")
def smollm2_dir(default_model_dir):
    return default_model_dir


def template_tokenizer(src, directory, name: str):
    """SmolLM2's BPE with the template's special tokens added and the template, BOS and EOS set."""
    template, family, bos, eos = TEMPLATES[name]
    tj = json.loads((src / "tokenizer.json").read_text())
    have = {t["content"] for t in tj["added_tokens"]}
    extra = [t for t in (bos, eos) if t] + FAMILY_TOKENS.get(name, FAMILY_TOKENS.get(family.split("-")[0].split(".")[0], []))
    next_id = max(max(tj["model"]["vocab"].values()), *(t["id"] for t in tj["added_tokens"])) + 1
    for token in extra:
        if token not in have:
            have.add(token)
            tj["added_tokens"].append({"id": next_id, "content": token, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": False, "special": True})
            next_id += 1
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(tj))
    config = {"chat_template": template, "bos_token": bos, "eos_token": eos, "add_bos_token": False,
              "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def hf_ids(hf, messages) -> list[int]:
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def trained_runs(ids: list[int], flags: list[bool]) -> list[list[int]]:
    runs, current = [], None
    for i, f in zip(ids, flags):
        if f:
            current = current if current is not None else []
            current.append(i)
        elif current is not None:
            runs.append(current)
            current = None
    return runs + ([current] if current is not None else [])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_masks_equal_apply_chat_template(name, smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    _, family, _, eos = TEMPLATES[name]
    directory = template_tokenizer(smollm2_dir, tmp_path / name, name)
    ours, hf = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)
    end = END_OF_TURN.get(family, eos)
    checked = 0
    for conv_name, messages in CONVERSATIONS.items():
        try:
            want = hf_ids(hf, messages)
        except Exception:  # Mistral v0.1 / v0.2 have no system role: refused by both
            with pytest.raises(ValueError, match="roles must alternate"):
                tokenize_chats(ours, [messages])
            continue
        [(ids, flags)] = tokenize_chats(ours, [messages])
        assert ids == want, f"{name} / {conv_name}"
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        expected = [LEAD.get(family, "") + (a.strip() if family in STRIPPED else a) + end for a in answers]
        got = [ours.decode(run) for run in trained_runs(ids, flags)]
        assert got == expected, f"{name} / {conv_name}"
        checked += 1
    assert checked >= 3


def test_straddling_token_is_refused_not_guessed(smollm2_dir, tmp_path):
    """A tokenizer that merges the header's last newline with the answer's first: no mask is made up."""
    directory = template_tokenizer(smollm2_dir, tmp_path / "chatml", "smollm2")
    tj = json.loads((directory / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 60000, "content": "\nX", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": False})
    (directory / "tokenizer.json").write_text(json.dumps(tj))
    tok = load_tokenizer(directory)
    straddles = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "X marks the spot"}]
    fine = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Y marks the spot"}]
    out = tokenize_chats(tok, [straddles, fine])
    assert out[0] is None and out[1] is not None


@pytest.mark.parametrize("name", ["mistral-v0.1", "mistral-v0.2", "mistral-2024"])
def test_masks_with_a_sentencepiece_tokenizer(name, spm_dir, tmp_path):
    """Mistral v0.1 / v0.2 ship a sentencepiece tokenizer in which [INST] is plain text: the space that starts the
    answer joins its first word ("▁Hi"), so the answer's tokens must still be found exactly."""
    from tests.test_chat import hf_tokenizer

    template, family, bos, eos = TEMPLATES[name]
    directory, reference = spm_dir
    local = tmp_path / "spm"
    shutil.copytree(directory, local)
    (local / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": bos,
                                                             "eos_token": eos, "add_bos_token": False}))
    ours, jinja = load_tokenizer(local), hf_tokenizer(bos, eos)
    for conv_name, messages in CONVERSATIONS.items():
        if messages[0]["role"] == "system" and name != "mistral-2024":
            continue
        text = jinja.apply_chat_template(messages, tokenize=False, chat_template=template)
        [(ids, flags)] = tokenize_chats(ours, [messages])
        assert ids == reference.encode(text, add_special_tokens=False).ids, f"{name} / {conv_name}"
        answers = [LEAD.get(family, "") + m["content"] + eos for m in messages if m["role"] == "assistant"]
        runs = trained_runs(ids, flags)
        assert len(runs) == len(answers)
        # sentencepiece decoding drops the space a run starts with: join the pieces' bytes instead
        assert [piece_text(reference, run) for run in runs] == answers, f"{name} / {conv_name}"


def piece_text(reference, ids: list[int]) -> str:
    pieces = (reference.id_to_token(i) for i in ids)
    return b"".join(bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.replace("▁", " ").encode()
                    for p in pieces).decode()

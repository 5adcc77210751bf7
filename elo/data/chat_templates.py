"""Chat templates rendered in Python, without jinja.

A tokenizer's `chat_template` is the raw jinja string from its tokenizer_config.json. Rather than interpreting
jinja, we recognise which known template it is and render that template's logic directly, byte for byte what
transformers' `apply_chat_template(messages, tokenize=False)` produces for plain system/user/assistant messages
(no tools). Recognition is by signature: every fragment listed for a variant must occur in the template (whitespace
between tokens, the quote style, `x['key']` vs `x.key` and a newline written as `\\n` do not matter; the text inside
string literals does). A template matching no variant is an error, never a guess.

Each renderer emits (text, trained) segments: the assistant's content and the token ending its turn are trained, the
rest (system, user turns, headers) is not, so `tokenize_chats` gives SFT masks by construction.

Supported (tests/test_chat.py checks each against transformers on the real template strings):
- ChatML with or without a default system prompt: SmolLM2, Qwen2, Qwen2.5 (no tools), OpenHermes-style.
- Llama 3 (`<|start_header_id|>`), and Llama 3.1 / 3.2 with their "Cutting Knowledge Date" system block.
- Mistral: v0.1 and v0.2/Mixtral as first released (no system role), their 2024 revision (system message
  prepended to the first user turn), and v0.3 (system message prepended to the last user turn).
"""
from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
# A rendering is a list of (text, trained) segments: the trained ones are the assistant's content and the token
# that ends its turn, so that SFT masks come from the template's own structure.
Segment = tuple[str, bool]


def _pattern(fragment: str) -> str:
    """Regex for a template fragment: literal text exact (either quote, newline as itself or `\\n`), any
    whitespace between the tokens outside literals."""
    parts, i = [], 0
    while i < len(fragment):
        c = fragment[i]
        if c in "'\"":
            end = fragment.index(c, i + 1)
            body = "".join(r"(?:\n|\\n)" if ch == "\n" else re.escape(ch) for ch in fragment[i + 1:end])
            parts.append(f"['\"]{body}['\"]")
            i = end + 1
        elif c.isspace():
            i += 1
            continue
        else:
            parts.append(re.escape(c))
            i += 1
        parts.append(r"\s*")
    return "".join(parts)


def _normalise(template: str) -> str:
    # message['content'] / message["content"] -> message.content: both spellings mean the same in jinja
    return re.sub(r"(?<=[\w\])])\[\s*(['\"])(\w+)\1\s*\]", r".\2", template)


def _has_all(template: str, fragments: tuple[str, ...]) -> bool:
    return all(re.search(_pattern(f), template) for f in fragments)


# ---- ChatML (<|im_start|>role\n...<|im_end|>\n) ----

_CHATML = (
    "'<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n'",
    "'<|im_start|>assistant\n'",
)
# a default system prompt is a literal system turn inside the template
_CHATML_DEFAULT_SYSTEM = re.compile(r"""['"]<\|im_start\|>system(?:\n|\\n)([^'"]+?)<\|im_end\|>""")


def _chatml(messages: list[Message], add_generation_prompt: bool, bos: str, eos: str, *,
            default_system: str | None) -> list[Segment]:
    out = []
    if default_system is not None and messages[0]["role"] != "system":
        out.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for m in messages:
        if m["role"] == "assistant":
            out += [("<|im_start|>assistant\n", False), (f"{m['content']}<|im_end|>", True), ("\n", False)]
        else:
            out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        out.append(("<|im_start|>assistant\n", False))
    return out


# ---- Llama 3 ----

_LLAMA3_TURN = "'<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>'"
_LLAMA3_HEADER = "'<|start_header_id|>assistant<|end_header_id|>\n\n'"
_LLAMA3 = (_LLAMA3_TURN, _LLAMA3_HEADER, "set content = bos_token + content")
_LLAMA31 = (
    _LLAMA3_TURN, _LLAMA3_HEADER, "bos_token",
    "set system_message = messages[0].content|trim",
    "'<|start_header_id|>system<|end_header_id|>\n\n'",
    "'Cutting Knowledge Date: December 2023\n'",
    "'Today Date: ' + date_string + '\n\n'",
    "system_message",
)


def _llama3(messages: list[Message], add_generation_prompt: bool, bos: str, eos: str) -> list[Segment]:
    out = [(bos, False)]
    for m in messages:
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            out += [(header, False), (f"{m['content'].strip()}<|eot_id|>", True)]
        else:
            out.append((f"{header}{m['content'].strip()}<|eot_id|>", False))
    if add_generation_prompt:
        out.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return out


def _llama31(messages: list[Message], add_generation_prompt: bool, bos: str, eos: str, *,
             date: Callable[[], str]) -> list[Segment]:
    # Llama 3 turns after a system block that is always there, dated, with the system message (if any) inside
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    head = (f"{bos}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            f"Today Date: {date()}\n\n{system}<|eot_id|>")
    return _llama3(messages, add_generation_prompt, head, eos)


def _llama31_date(template: str) -> Callable[[], str]:
    # Llama 3.2 asks the renderer for today's date (transformers provides strftime_now); 3.1 has a fixed default
    now = re.search(r"""strftime_now\(\s*['"]([^'"]+)['"]\s*\)""", template)
    if now:
        return lambda: datetime.datetime.now().strftime(now.group(1))
    fixed = re.search(r"""set\s+date_string\s*=\s*['"]([^'"]+)['"]""", template)
    if not fixed:
        raise ValueError(f"Llama 3.1 chat template without a default date_string: {template[:80]!r}")
    return lambda: fixed.group(1)


# ---- Mistral [INST] ----

@dataclass(frozen=True)
class MistralLayout:
    name: str
    signature: tuple[str, ...]
    user: tuple[str, str]  # text before and after a user turn
    assistant: tuple[str, str]  # text before an assistant turn, and after its EOS token
    strip_assistant: bool
    system_at: str | None  # None: no system role; "first" / "last": prepended to that user turn


_MISTRAL = (
    MistralLayout("mistral-v0.1", ("bos_token", "'[INST] ' + message.content + ' [/INST]'",
                                   "message.content + eos_token + ' '"),
                  ("[INST] ", " [/INST]"), ("", " "), False, None),
    MistralLayout("mistral-v0.2", ("bos_token", "'[INST] ' + message.content + ' [/INST]'",
                                   "message.content + eos_token"),
                  ("[INST] ", " [/INST]"), ("", ""), False, None),
    MistralLayout("mistral-2024", ("bos_token", "' [INST] ' + system_message + '\n\n' + message.content + ' [/INST]'",
                                   "' [INST] ' + message.content + ' [/INST]'", "' ' + message.content + eos_token",
                                   "loop.first and system_message is defined"),
                  (" [INST] ", " [/INST]"), (" ", ""), False, "first"),
    MistralLayout("mistral-v0.3", ("bos_token", "'[INST] ' + system_message + '\n\n' + message.content + '[/INST]'",
                                   "'[INST] ' + message.content + '[/INST]'", "' ' + message.content|trim + eos_token",
                                   "loop.last and system_message is defined"),
                  ("[INST] ", "[/INST]"), (" ", ""), True, "last"),
)


def _mistral(messages: list[Message], add_generation_prompt: bool, bos: str, eos: str, *,
             layout: MistralLayout) -> list[Segment]:
    system = None
    if layout.system_at is not None and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = [(bos, False)]
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError(f"{layout.name} chat template: roles must alternate user/assistant/user/... after "
                             f"{'an optional system message' if layout.system_at else 'nothing (no system role)'}; "
                             f"got {[m['role'] for m in messages]}")
        if m["role"] == "user":
            at_system = system is not None and i == (0 if layout.system_at == "first" else len(messages) - 1)
            content = f"{system}\n\n{m['content']}" if at_system else m["content"]
            out.append((f"{layout.user[0]}{content}{layout.user[1]}", False))
        else:
            content = m["content"].strip() if layout.strip_assistant else m["content"]
            # the space before the answer is the model's to generate (SentencePiece joins it to the first word)
            out += [(f"{layout.assistant[0]}{content}{eos}", True), (layout.assistant[1], False)]
    return out  # Mistral templates add nothing for add_generation_prompt


# ---- recognition ----

Renderer = Callable[[list[Message], bool, str, str], list[Segment]]


@functools.lru_cache(maxsize=16)
def chat_renderer(template: str) -> tuple[str, Renderer]:
    """(family name, render(messages, add_generation_prompt, bos_token, eos_token) -> segments) for a raw jinja
    template."""
    t = _normalise(template)
    if _has_all(t, _CHATML) and not re.search(r"\b(bos|eos)_token\b", t):
        defaults = {d.replace("\\n", "\n") for d in _CHATML_DEFAULT_SYSTEM.findall(t)}
        if len(defaults) > 1 or any("\\" in d for d in defaults):
            raise ValueError(f"unsupported ChatML chat template (default system prompt {sorted(defaults)}): "
                             f"{template[:80]!r}")
        return "chatml", functools.partial(_chatml, default_system=defaults.pop() if defaults else None)
    if _has_all(t, _LLAMA31):
        return "llama3.1", functools.partial(_llama31, date=_llama31_date(t))
    if _has_all(t, _LLAMA3) and "Cutting Knowledge Date" not in t:
        return "llama3", _llama3
    for layout in _MISTRAL:
        if _has_all(t, layout.signature) and "<<SYS>>" not in t:
            return layout.name, functools.partial(_mistral, layout=layout)
    raise ValueError(f"unrecognised chat template {template[:80]!r}; expected ChatML (SmolLM2, Qwen2/2.5), "
                     "Llama 3/3.1/3.2 or Mistral [INST]")


def _check(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("messages is empty; expected at least one {'role': ..., 'content': ...} message")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad chat message {m!r}; expected {{'role': one of {ROLES}, 'content': str}}")


def _token_text(tokenizer: Any, token_id: int | None) -> str:
    # transformers renders an unset bos/eos token as "" (an undefined jinja variable)
    if token_id is None:
        return ""
    by_id = {i: s for s, i in tokenizer.special_tokens.items()}
    return by_id[token_id] if token_id in by_id else tokenizer.decode([token_id])


def chat_segments(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> list[Segment]:
    """The rendering of `messages` as (text, trained) segments; their texts joined are `render_chat`'s text."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat_template; expected an instruct model's tokenizer")
    _check(messages)
    _, render = chat_renderer(tokenizer.chat_template)
    return render(messages, add_generation_prompt, _token_text(tokenizer, tokenizer.bos_id),
                  _token_text(tokenizer, tokenizer.eos_id))


def render_chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` under the tokenizer's chat template, as transformers' apply_chat_template
    (tokenize=False) renders it. Encode it with special tokens parsed and no extra BOS (the template has it)."""
    return "".join(text for text, _ in chat_segments(tokenizer, messages, add_generation_prompt))


def tokenize_chats(tokenizer: Any, conversations: list[list[Message]]) -> list[tuple[list[int], list[bool]] | None]:
    """Token ids of each conversation as apply_chat_template(tokenize=True) gives them, with a train flag per token:
    True on the assistant's content and its end-of-turn token, False on everything else.

    The ids are those of the whole text; a flag changes at the token where the text's segments change from
    untrained to trained or back. Where no token starts there (a tokenizer merging a header's last characters with
    the answer's first), the conversation's entry is None rather than a guessed mask."""
    texts, cuts = [], []
    for messages in conversations:
        text, bounds, before = "", [], False
        for piece, trained in chat_segments(tokenizer, messages, add_generation_prompt=False):
            if trained != before:
                bounds.append(len(text))
            text, before = text + piece, trained
        texts.append(text)
        cuts.append(bounds)
    encoded = iter(tokenizer.encode_batch([t[:b] for t, bounds in zip(texts, cuts) for b in [len(t), *bounds]]))
    out: list[tuple[list[int], list[bool]] | None] = []
    for text, bounds in zip(texts, cuts):
        ids = next(encoded)
        stops = [_token_boundary(tokenizer, ids, next(encoded), text[:b]) for b in bounds]
        if None in stops:
            out.append(None)
            continue
        flags, trained, start = [], False, 0
        for stop in [*stops, len(ids)]:
            flags += [trained] * (stop - start)
            trained, start = not trained, stop
        out.append((ids, flags))
    return out


def _token_boundary(tokenizer: Any, ids: list[int], prefix_ids: list[int], prefix: str) -> int | None:
    """k such that ids[:k] is exactly the text `prefix` (whose own tokens are `prefix_ids`), or None."""
    if ids[:len(prefix_ids)] == prefix_ids:
        return len(prefix_ids)
    # the prefix alone may split its tail differently (e.g. "\n\n" at the end of a text vs before a word), yet a
    # token of the whole text may still start at the boundary: look near where the two tokenizations part
    common = next((i for i, (a, b) in enumerate(zip(ids, prefix_ids)) if a != b), min(len(ids), len(prefix_ids)))
    for k in range(common, min(len(ids), len(prefix_ids) + 2) + 1):
        if tokenizer.decode(ids[:k]) == prefix:
            return k
    return None


# tokens that end an assistant turn, besides the tokenizer's EOS
_END_OF_TURN = {"chatml": ("<|im_end|>", "<|endoftext|>"), "llama3": ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")}


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Ids that end the assistant's turn: the EOS token and the template family's end-of-turn tokens."""
    family = chat_renderer(tokenizer.chat_template)[0] if tokenizer.chat_template else ""
    names = _END_OF_TURN.get(family.split(".")[0], ())
    ids = {tokenizer.special_tokens[n] for n in names if n in tokenizer.special_tokens}
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    if not ids:
        raise ValueError("the tokenizer has no EOS or end-of-turn token; generation could not stop")
    return ids

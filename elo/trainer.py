"""The training loop shared by ELO pretraining, full fine-tuning and LoRA (and later alignment and SFT).

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences on each of `world_size` ranks. The loss is
summed over the target tokens of the whole global batch and divided by their global count, so every token weighs the
same whatever micro-batch or rank it lands on (a mean per micro-batch would reweight the language mix).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from elo import distributed
from elo.checkpoint import load_model, save_model
from elo.data import build_dataset, parse_mix
from elo.default_model import DEFAULT_MODEL
from elo.files import atomic_write_text
from elo.flops import peak_flops, train_flops_per_token
from elo.lora import add_lora, merge_lora_state
from elo.model import Transformer
from elo.surgery import load_detached
from elo.tokenizer import load_tokenizer

# arguments that may change between a run and its resumption; every other one must match
_RESUMABLE = {"resume", "save_every", "eval_every", "eval_batches"}


@dataclass
class TrainConfig:
    data: dict[str, list[str]]  # language -> files
    out: str
    model: str = DEFAULT_MODEL
    layers: str = "1,-1"  # 1-based decoder layers to detach and train (ELO), or "all" (full fine-tuning)
    lora_rank: int = 0  # > 0: LoRA on the whole model instead (the baseline)
    lora_alpha: float | None = None  # default 2 * rank
    train_embeddings: bool = False  # ELO: also train the embedding, final norm and head
    mix: str | None = None  # "en:1,ko:9"; omitted for English + one language: the paper's 1:9
    text_field: str = "text"  # JSONL field holding the text
    seq_len: int = 2048
    batch_size: int = 4  # sequences per micro-batch per rank
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0  # 0: only the final model
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 8  # validation batches per language
    val_tokens: int | None = None  # held-out tokens per language (default: see elo.data)
    activation_checkpointing: bool = False
    compile: bool = False
    resume: bool = False
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)  # recorded with the run (e.g. the command line)

    @property
    def mode(self) -> str:
        if self.lora_rank > 0:
            return "lora"
        return "full" if self.layers == "all" else "elo"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps` (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    """The model to train, with exactly the parameters to train requiring grad (fp32 master weights)."""
    if cfg.mode == "lora":
        if cfg.layers not in ("all", TrainConfig.layers):
            raise ValueError(f"--lora-rank trains adapters on every layer; drop --layers {cfg.layers} or use 'all'")
        model = add_lora(load_model(cfg.model, device=device), cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank)
    elif cfg.mode == "full":
        model = load_model(cfg.model, device=device)
    else:
        model = load_detached(cfg.model, cfg.layers, device=device)
        model.requires_grad_(False)
        model.model.layers.requires_grad_(True)
        if cfg.train_embeddings:
            model.model.embed_tokens.requires_grad_(True)
            model.model.norm.requires_grad_(True)
            model.lm_head.requires_grad_(True)
    return model


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms and biases
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def token_losses(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token cross-entropy, per-sequence sums for logging); targets < 0 are ignored; fp32."""
    total, per_token = model(inputs, targets=targets)
    return total, per_token.sum(1)


# ---- checkpoints ----

def _checkpoint_dirs(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*"))


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, sampler, d: distributed.Dist,
                    tokens: int) -> Path:
    """Model, optimizer, data position and RNG, written to a hidden directory that is renamed only when complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out / "checkpoints" / f"step_{step:08d}"
    tmp = out / "checkpoints" / f".tmp-step_{step:08d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(d)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not d.sharded)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / f"rng_rank{d.rank}.pt")
    if d.main:
        state = {"step": step, "tokens": tokens, "data": sampler.state_dict(), "world_size": d.world_size}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
    distributed.barrier(d)
    if d.main:
        os.replace(tmp, final)
    distributed.barrier(d)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer, sampler, d: distributed.Dist) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != d.world_size:
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes; resume with as many")
    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=path, no_dist=not d.sharded)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    sampler.load_state_dict(state["data"])
    rng = torch.load(path / f"rng_rank{d.rank}.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _prepare_out(cfg: TrainConfig, out: Path, d: distributed.Dist) -> Path | None:
    """Check `out` against this run; return the checkpoint to resume from, if any."""
    saved = out / "train_config.json"
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE and k != "extra"}
    if saved.is_file():
        theirs = {k: v for k, v in json.loads(saved.read_text()).items() if k not in _RESUMABLE and k != "extra"}
        if not cfg.resume:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"--resume with different arguments than the run in {out}: "
                             + ", ".join(f"{k}={mine.get(k)!r} (was {theirs.get(k)!r})" for k in diff))
    elif out.exists() and any(out.iterdir()) and not cfg.resume:
        raise ValueError(f"--out {out} is not empty and holds no elo run; choose an empty or new directory")
    ckpts = _checkpoint_dirs(out)
    distributed.barrier(d)  # every rank has checked before rank 0 writes
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return ckpts[-1] if cfg.resume and ckpts else None


# ---- the loop ----

def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:  # VmHWM: this process's own peak (ru_maxrss is inherited from the parent across exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e6
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


@torch.no_grad()
def evaluate(model: nn.Module, sampler, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean held-out loss per language over the first `eval_batches` validation batches (identical on every rank)."""
    model.eval()
    result = {}
    for lang in sampler.langs:
        total = count = 0.0
        for i, batch in enumerate(sampler.val_batches(lang, cfg.batch_size)):
            if i == cfg.eval_batches:
                break
            total += token_losses(model, batch.inputs.to(device), batch.targets.to(device))[0].item()
            count += (batch.targets >= 0).sum().item()
        result[f"val_loss/{lang}"] = total / count
    model.train()
    return result


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint being resumed (written before a crash), so each step is logged once."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _final_state(model: nn.Module, d: distributed.Dist) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not d.sharded:
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the directory of the final HF-format model."""
    d = distributed.init()
    try:
        return _train(cfg, d)
    finally:
        distributed.close(d)


def _train(cfg: TrainConfig, d: distributed.Dist) -> Path:
    out = Path(cfg.out)
    resume_from = _prepare_out(cfg, out, d)
    torch.manual_seed(cfg.seed)  # the same on every rank: model init (LoRA) must agree before sharding
    tokenizer = load_tokenizer(cfg.model)
    mix = parse_mix(cfg.mix) if cfg.mix else None
    sampler, info = build_dataset(cfg.data, tokenizer, cfg.seq_len, mix, cfg.seed, d.rank, d.world_size,
                                  cache_dir=cfg.cache_dir, field=cfg.text_field, val_tokens=cfg.val_tokens)

    model = build_model(cfg, d.device)
    config = model.config
    flops_per_token = train_flops_per_token(model, cfg.seq_len)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers.values():
        if cfg.activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(layer)
        if cfg.compile:
            layer.compile()
    model = distributed.shard(model, d)
    # a single CUDA process gets bf16 compute through autocast; FSDP's policy does it for several
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=d.device.type == "cuda" and not d.sharded)
    optimizer = make_optimizer(model, cfg, d.device)
    peak = peak_flops(d.device) * d.world_size

    step = tokens = 0
    metrics = out / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, sampler, d)
        step, tokens = state["step"], state["tokens"]
        if d.main:
            _truncate_metrics(metrics, step)
            print(f"resumed from {resume_from} at step {step}", flush=True)
    if d.main:
        print(f"{cfg.mode}: training {n_trainable:,} of {n_total:,} parameters ({config.num_hidden_layers} decoder "
              f"layers), {flops_per_token / 1e9:.2f} GFLOP/token, {d.world_size} process(es) on {d.device.type}, "
              f"global batch {cfg.batch_size * cfg.grad_accum * d.world_size} x {cfg.seq_len} tokens", flush=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.eval_every and step == 0:  # the starting point, to measure what training changed
        record = {"step": 0, "tokens": 0} | evaluate(model, sampler, cfg, d.device)
        if d.main:
            _log(metrics, record)
            print("step 0 | " + " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_")), flush=True)
    started = time.perf_counter()
    start_step = step
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [sampler.next_batch(cfg.batch_size) for _ in range(cfg.grad_accum)]
        local = torch.tensor([float((b.targets >= 0).sum()) for b in batches]).sum().view(1)
        n_global = distributed.all_reduce_sum(local, d).item()
        # gradients of FSDP are averaged over ranks: scale by world_size so the result is sum / global count
        scale = d.world_size / n_global
        lang_loss = {lang: torch.zeros(2) for lang in sampler.langs}  # summed loss, tokens
        for i, batch in enumerate(batches):
            if d.sharded:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            with autocast:
                loss, per_seq = token_losses(model, batch.inputs.to(d.device), batch.targets.to(d.device))
            (loss * scale).backward()
            for lang, seq_loss, n in zip(batch.langs, per_seq.detach().cpu(), (batch.targets >= 0).sum(1)):
                lang_loss[lang] += torch.stack([seq_loss, n.float()])
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += int(n_global)

        stacked = distributed.all_reduce_sum(torch.stack([lang_loss[l] for l in sampler.langs]), d)
        dt = time.perf_counter() - t0
        record = {
            "step": step, "loss": stacked[:, 0].sum().item() / n_global, "lr": lr, "tokens": tokens,
            "tokens_per_s": n_global / dt, "step_time_s": dt, "mfu": flops_per_token * n_global / dt / peak,
            "grad_norm": grad_norm.item(), "peak_memory_gb": _peak_memory_gb(d.device),
        }
        record |= {f"loss/{l}": (s / n).item() for l, (s, n) in zip(sampler.langs, stacked) if n > 0}
        is_last = step == cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or is_last:
            record |= evaluate(model, sampler, cfg, d.device)
        if d.main:
            _log(metrics, record)
            elapsed = time.perf_counter() - started
            eta = elapsed / (step - start_step) * (cfg.max_steps - step)
            vals = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_loss"))
            print(f"step {step}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                  f"{record['tokens_per_s']:,.0f} tok/s | mfu {record['mfu']:.1%} | "
                  f"mem {record['peak_memory_gb']:.2f} GB | eta {eta:,.0f}s {vals}".rstrip(), flush=True)
        if cfg.save_every and step % cfg.save_every == 0 and not is_last:
            save_checkpoint(out, step, model, optimizer, sampler, d, tokens)

    state = _final_state(model, d)
    final = out / "model"
    if d.main:
        if cfg.mode == "lora":
            state = merge_lora_state(state, (cfg.lora_alpha or 2 * cfg.lora_rank) / cfg.lora_rank)
        trained = Transformer.from_state_dict(config, {k: v.detach().cpu() for k, v in state.items()})
        trained.name_or_path = cfg.model
        save_model(trained, final)
        print(f"saved {cfg.mode} model to {final}", flush=True)
    distributed.barrier(d)
    return final


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from `train.py` command-line arguments."""
    import argparse

    p = argparse.ArgumentParser(description="ELO pretraining (and the full fine-tuning / LoRA baselines).")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF model directory, hub id, or the offline default")
    p.add_argument("--layers", default="1,-1", help="1-based layers to detach and train, e.g. 1,32; 'all' = full FT")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on the whole model")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--train-embeddings", action="store_true", help="ELO: also train embedding, final norm and head")
    p.add_argument("--data", action="append", required=True, metavar="LANG=PATH",
                   help="training text (JSONL or .txt) for a language; repeat for more files or languages")
    p.add_argument("--mix", default=None, help="token proportions, e.g. en:1,ko:9 (default 1:9 for en + one)")
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--min-lr-ratio", type=float, default=TrainConfig.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: final model only)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (always at the end)")
    p.add_argument("--eval-batches", type=int, default=TrainConfig.eval_batches)
    p.add_argument("--val-tokens", type=int, default=None, help="held-out tokens per language")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--cache-dir", default=None, help="token cache directory (default ~/.cache/elo/data)")
    a = p.parse_args(argv)
    from elo.data import parse_data

    for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected a positive integer")
    return TrainConfig(
        data={k: [str(x) for x in v] for k, v in parse_data(a.data).items()}, out=a.out, model=a.model,
        layers=a.layers, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, train_embeddings=a.train_embeddings,
        mix=a.mix, text_field=a.field, seq_len=a.seq_len, batch_size=a.batch_size, grad_accum=a.grad_accum,
        max_steps=a.max_steps, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps,
        weight_decay=a.weight_decay, grad_clip=a.grad_clip, seed=a.seed, save_every=a.save_every,
        eval_every=a.eval_every, eval_batches=a.eval_batches, val_tokens=a.val_tokens,
        activation_checkpointing=a.activation_checkpointing, compile=a.compile, resume=a.resume,
        cache_dir=a.cache_dir, extra={"argv": sys.argv},
    )

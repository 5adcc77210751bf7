"""The training loop shared by every stage: ELO pretraining, the full fine-tuning and LoRA baselines, alignment, SFT.

A stage plugs in two parts and the loop does the rest:
- a model, built by `elo.train.build` (which tensors, from where, which train; sharded loading);
- a batch source (`BatchSource`: pretraining text windows in `elo.data.text`, chat conversations for SFT).
The loop's own parts: the optimizer and schedule, the step, validation, train-state checkpoints (`elo.train.run_dir`),
metrics and the progress line (`elo.train.metrics`). Exporting the trained model is `elo.train.build.export`.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences on each of `world_size` ranks. The loss is
summed over the target tokens of the whole global batch and divided by their global count, so every token weighs the
same whatever micro-batch or rank it lands on (a mean per micro-batch would reweight the language mix).
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from elo.data.text import Batch
from elo.model import Transformer
from elo.tools.files import atomic_write_text
from elo.train import distributed
from elo.train.build import ModelSpec, export
from elo.train.options import LoopConfig
from elo.train.flops import train_flops_per_token
from elo.train.loggers import open_logger
from elo.train.metrics import StepTimer, format_progress, mfu, peak_flops_info
from elo.train.run_dir import RunDir


class Probe(Protocol):
    """A measurement some steps add to their metrics record (it must not change the model or the data stream)."""

    def due(self, step: int) -> bool: ...
    def measure(self, model: nn.Module, source: BatchSource) -> dict[str, float]: ...


class BatchSource(Protocol):
    """What the loop draws batches from (elo.data.text.MixtureSampler, the SFT chat source)."""

    langs: list[str]
    epochs: dict[str, float]  # passes over each language's training data so far

    def next_batch(self, batch_size: int) -> Batch: ...
    def val_batches(self, lang: str, batch_size: int) -> Iterator[Batch]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps` (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, cfg: LoopConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms and biases
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


@torch.no_grad()
def validation_loss(model: nn.Module, source: BatchSource, batch_size: int, max_batches: int,
                    device: torch.device, prefix: str = "val_loss") -> dict[str, float]:
    """Mean held-out loss per language over the first `max_batches` validation batches (the same on every rank)."""
    was_training = model.training
    model.eval()
    result = {}
    for lang in source.langs:
        total = count = 0.0
        for i, batch in enumerate(source.val_batches(lang, batch_size)):
            if i == max_batches:
                break
            total += model(batch.inputs.to(device), targets=batch.targets.to(device), documents=batch.documents)[0].item()
            count += (batch.targets >= 0).sum().item()
        if count == 0:
            raise ValueError(f"no held-out tokens for language {lang!r}; hold some out (e.g. --val-tokens)")
        result[f"{prefix}/{lang}"] = total / count
    model.train(was_training)
    return result


class StopRequest:
    """SIGINT / SIGTERM (what a scheduler sends before it kills a job) ask the loop to checkpoint at the next step
    boundary and exit; a second signal interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(signal again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_loop(cfg: LoopConfig, model: nn.Module, source: BatchSource, d: distributed.Dist, run: RunDir,
               flops_per_token: float, label: str, step0_extra: dict | None = None,
               probe: Probe | None = None) -> dict:
    """Train `model` on `source` until `cfg.max_steps` (resuming from `run`'s newest checkpoint with --resume).
    Returns {"steps", "tokens", "seconds"}. `step0_extra` is logged with the step-0 validation record; `probe`
    (e.g. train.py --fidelity-every) adds its measurements to the records of the steps it chooses, step 0 included."""
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=d.device.type == "cuda" and not d.sharded)
    optimizer = make_optimizer(model, cfg, d.device)
    peak, peak_text = ((cfg.peak_flops, f"--peak-flops {cfg.peak_flops:.3g} FLOP/s per process") if cfg.peak_flops
                       else peak_flops_info(d.device))
    peak *= d.world_size

    step = tokens = 0
    if cfg.resume:
        state = run.load_latest(model, optimizer, source, d)
        if state is not None:
            step, tokens = state["step"], state["tokens"]
            if d.main:
                print(f"resumed from {state['path']} at step {step}", flush=True)
        elif d.main:
            print(f"--resume: no complete checkpoint in {run.checkpoints}; starting from step 0", flush=True)
    if d.main:
        run.clean_temps()
        run.truncate_metrics(step)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        print(f"{label}: training {n_train:,} of {n_total:,} parameters ({model.config.num_hidden_layers} decoder "
              f"layers), {flops_per_token / 1e9:.2f} GFLOP/token, {d.world_size} process(es) on {d.device.type}, "
              f"global batch {cfg.batch_size * cfg.grad_accum * d.world_size} x {cfg.seq_len} tokens; "
              f"MFU against {peak_text}", flush=True)
        if cfg.warmup_steps >= cfg.max_steps:
            print(f"warning: --warmup-steps {cfg.warmup_steps} >= --max-steps {cfg.max_steps}: the run is all warmup "
                  f"(its last step trains at {lr_at(cfg.max_steps - 1, cfg):.3g}, --lr is {cfg.lr:g})",
                  file=sys.stderr, flush=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if step == 0:  # the starting point, to measure what training changed
        record = {"step": 0, "tokens": 0} | (step0_extra or {}) | validation_loss(
            model, source, cfg.batch_size, cfg.eval_batches, d.device)
        if probe is not None and probe.due(0):
            record |= probe.measure(model, source)
        if d.main:
            run.log(record)
            print("step 0 | " + " ".join(f"{k} {v:.4f}" for k, v in record.items() if "loss" in k), flush=True)
    timer = StepTimer(step, cfg.max_steps)
    timer.reset_peak_memory(d.device)
    model.train()
    with StopRequest() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [source.next_batch(cfg.batch_size) for _ in range(cfg.grad_accum)]
            local = torch.tensor([[float((b.targets >= 0).sum()), float(b.num_tokens)] for b in batches]).sum(0)
            n_global, read_global = distributed.all_reduce_sum(local, d).tolist()
            if n_global == 0:
                raise ValueError(f"step {step + 1}: the global batch has no target tokens")
            # FSDP averages gradients over ranks: scale by world_size so the result is sum / global count
            scale = d.world_size / n_global
            lang_loss = {lang: torch.zeros(2) for lang in source.langs}  # summed loss, tokens
            # each micro-batch's gradients are reduce-scattered as its backward ends (as torchtitan does): deferring
            # the sync to the last one would hold every rank's gradients unsharded in fp32 meanwhile (30 GB on 8B)
            for batch in batches:
                with autocast:
                    loss, per_token = model(batch.inputs.to(d.device), targets=batch.targets.to(d.device),
                                            documents=batch.documents)
                (loss * scale).backward()
                for lang, loss_sum, n in batch.loss_by_language(per_token.detach().cpu()):
                    lang_loss[lang] += torch.stack([loss_sum, n.float()])
            # max_norm inf: measure without clipping (--grad-clip 0, as in HF)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            stacked = distributed.all_reduce_sum(torch.stack([lang_loss[l] for l in source.langs]), d)
            step_loss = stacked[:, 0].sum().item() / n_global
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm.item())):
                raise FloatingPointError(
                    f"step {step + 1}: loss {step_loss} / gradient norm {grad_norm.item()} is not finite; stopped "
                    f"without updating the model (the last checkpoint in {run.checkpoints} is intact; check the "
                    f"model's weights, or lower --lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(n_global)

            dt = time.perf_counter() - t0
            record = {
                "step": step, "loss": step_loss, "lr": lr, "tokens": tokens, "tokens_per_s": read_global / dt,
                "step_time_s": dt, "mfu": mfu(flops_per_token * read_global / dt, peak), "grad_norm": grad_norm.item(),
                "peak_memory_gb": timer.peak_memory_gb(d.device),
            }
            record |= {f"loss/{l}": (s / n).item() for l, (s, n) in zip(source.langs, stacked) if n > 0}
            is_last = step == cfg.max_steps
            if (cfg.eval_every and step % cfg.eval_every == 0) or is_last:
                record |= validation_loss(model, source, cfg.batch_size, cfg.eval_batches, d.device)
            if probe is not None and probe.due(step):
                record |= probe.measure(model, source)
            if d.main:
                run.log(record)
                print(format_progress(record, cfg.max_steps, timer.eta(step)), flush=True)
            stopping = distributed.all_reduce_sum(torch.tensor([float(stop.requested)]), d).item() > 0
            if ((cfg.save_every and step % cfg.save_every == 0) or stopping) and not is_last:
                path = run.save(step, model, optimizer, source, d, tokens, cfg.keep_checkpoints)
                if stopping:
                    if d.main:
                        print(f"stopped at step {step}/{cfg.max_steps}; checkpoint {path}. Continue with the same "
                              f"command plus --resume", file=sys.stderr, flush=True)
                    raise SystemExit(130)
    if d.main:
        print(f"trained {step} steps, {tokens:,} tokens in {timer.elapsed():,.0f}s; data epochs: "
              + ", ".join(f"{l} {e:.3f}" for l, e in source.epochs.items()), flush=True)
    return {"steps": step, "tokens": tokens, "seconds": timer.elapsed()}


def fit(cfg: LoopConfig, model: Transformer, spec: ModelSpec, source: BatchSource, d: distributed.Dist, label: str,
        provenance: dict, extra: dict | None = None, probe: Probe | None = None) -> Path:
    """Train the materialized `model` (built from `spec`) on `source`, then export it with its provenance record
    (`elo_run.json`: `provenance` plus tokens, steps, seconds and the data position). `extra`: fields for the step-0
    metrics record (e.g. the base model's validation loss)."""
    run = RunDir(cfg.out)
    flops = train_flops_per_token(model, cfg.seq_len)
    if d.main:
        run.start(cfg.record())
        run.mirror = open_logger(cfg.log, run.out, label, cfg.record())
    try:
        stats = train_loop(cfg, model, source, d, run, flops, label, extra, probe)
    finally:
        if run.mirror is not None:
            run.mirror.close()
    record = provenance | {"tokens": stats["tokens"], "steps": stats["steps"],
                           "seconds": round(stats["seconds"], 1), "data_state": source.state_dict()}

    def write_provenance(tmp: Path) -> None:
        atomic_write_text(tmp / "elo_run.json", json.dumps(record, indent=2) + "\n")

    try:
        export(model, run.model, d, spec.lora[1] / spec.lora[0] if spec.lora else None, write_provenance,
               spec.export_config)
    except OSError as e:
        kept = run.complete_checkpoints()
        how = (f"the newest checkpoint {kept[-1]} is kept: free space, then rerun with --resume to export from it"
               if kept else "no checkpoint was written (--save-every 0): free space and train again, with "
                            "--save-every N to keep a checkpoint")
        raise OSError(f"writing the model to {run.model} failed ({e.strerror or e}); "
                      f"{shutil.disk_usage(run.out).free / 1e9:.2f} GB free there; {how}") from e
    if d.main:
        print(f"saved {label} model to {run.model}", flush=True)
    return run.model


def resuming(cfg: LoopConfig) -> bool:
    """Whether this run continues from a checkpoint (so one-time work before step 0 is already done)."""
    return cfg.resume and bool(RunDir(cfg.out).complete_checkpoints())

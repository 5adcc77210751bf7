"""Options every stage shares, declared once as dataclass fields (the command line derives from them,
elo.tools.cli), and `prepare`: a stage's checks before any work, in one place."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from elo.data.sources import parse_source
from elo.data.text import build_dataset, parse_data, parse_mix
from elo.hf.checkpoint import load_config
from elo.hf.hub import resolve
from elo.tools.cli import option
from elo.tools.files import check_not_owned, lock_output, unlock_output
from elo.train import distributed
from elo.train.build import ModelSpec, add_lora_spec
from elo.train.loggers import check_logger
from elo.train.run_dir import RunDir


@dataclass(kw_only=True)
class LoopConfig:
    """Options every stage shares (optimization, checkpoints, validation). Command-line options derive from these
    fields (elo.tools.cli.add_dataclass_options)."""
    out: str = field(metadata=option("run directory (created; --resume continues the run in it)"))
    seq_len: int = field(default=2048, metadata=option("tokens per sequence"))
    batch_size: int = field(default=4, metadata=option("sequences per micro-batch per process"))
    grad_accum: int = field(default=1, metadata=option("micro-batches per optimizer step"))
    max_steps: int = field(default=1000, metadata=option("optimizer steps"))
    lr: float = field(default=1e-4, metadata=option("peak learning rate"))
    min_lr_ratio: float = field(default=0.1, metadata=option("cosine decays to lr * this, in [0, 1]"))
    warmup_steps: int = field(default=100, metadata=option("linear warmup steps"))
    weight_decay: float = field(default=0.1, metadata=option("AdamW weight decay (not on norms and biases)"))
    grad_clip: float = field(default=1.0, metadata=option("clip the gradient norm to this; 0: no clipping"))
    seed: int = field(default=0, metadata=option("data order and initialisation seed"))
    save_every: int = field(default=0, metadata=option("train-state checkpoint every N steps (0: none)"))
    keep_checkpoints: int = field(default=2, metadata=option("keep the newest K checkpoints (0: all)"))
    eval_every: int = field(default=0, metadata=option("held-out loss every N steps (always at start and end)"))
    eval_batches: int = field(default=8, metadata=option("validation batches per language"))
    activation_checkpointing: bool = field(default=False, metadata=option("recompute layer activations in backward"))
    compile: bool = field(default=False, metadata=option("torch.compile each decoder layer"))
    cpu_offload: bool = field(default=False, metadata=option(
        "FSDP2 CPU offload of parameters, gradients and optimizer state (CUDA, under torchrun even for one GPU)"))
    resume: bool = field(default=False, metadata=option("continue from the newest complete checkpoint in --out"))
    peak_flops: float | None = field(default=None, metadata=option(
        "the FLOP/s per process that MFU is measured against (default: a known GPU's bf16 dense peak; on CPU the "
        "fp32 matmul rate measured at start-up, which a busy machine lowers)"))
    log: str | None = field(default=None, metadata=option(
        "also log every metrics.jsonl field to 'tensorboard' (--out/tensorboard) or 'wandb' (WANDB_MODE=offline "
        "works without network); metrics.jsonl stays the record"))

    # may change between a run and its resumption; every other field must match
    VOLATILE = frozenset({"resume", "save_every", "keep_checkpoints", "eval_every", "eval_batches", "out",
                          "cache_dir", "log", "peak_flops"})

    def validate(self) -> None:
        """Every option against its range, before any work: a one-line error naming the option."""
        positive = ["seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches"]
        non_negative = ["warmup_steps", "save_every", "keep_checkpoints", "eval_every", "seed"]
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:  # max_steps None: a stage derives it
                raise ValueError(f"{_flag(name)} {getattr(self, name)}: expected a positive integer")
        for name in non_negative:
            if getattr(self, name) is not None and getattr(self, name) < 0:  # warmup None: a stage derives it
                raise ValueError(f"{_flag(name)} {getattr(self, name)}: expected 0 or a positive integer")
        check_logger(self.log)
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            raise ValueError(f"--peak-flops {self.peak_flops}: expected a positive number of FLOP/s, e.g. 9.89e14")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr {self.lr}: expected a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio {self.min_lr_ratio}: expected a number in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(name)} {value}: expected 0 or a positive number"
                                 + (" (0 turns clipping off)" if name == "grad_clip" else ""))

    def record(self) -> dict:
        """The arguments as written to train_config.json."""
        return dataclasses.asdict(self)

    def defaults(self) -> dict:
        """Each option's default: what a saved run that predates an option ran with."""
        return {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class LoRAOptions:
    """The LoRA options of a stage's config (train.py's baseline, low-memory alignment, SFT)."""
    lora_rank: int = field(default=0, metadata=option("train LoRA adapters of this rank on every decoder linear "
                                                      "instead of the weights (0: off)"))
    lora_alpha: float | None = field(default=None, metadata=option("LoRA alpha (default 2 * rank)"))

    def validate_lora(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank {self.lora_rank}: expected 0 (off) or a positive integer")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha {self.lora_alpha}: expected a positive number")

    def with_lora(self, spec: ModelSpec, seed: int) -> ModelSpec:
        if not self.lora_rank:
            return spec
        return add_lora_spec(spec, self.lora_rank, self.lora_alpha or 2 * self.lora_rank, seed)


def data_specs(specs: list[str]) -> dict[str, list[str]]:
    """Repeated `--data LANG=SOURCE` -> {lang: [SOURCE strings, local paths made absolute]}; a repeated language adds
    sources."""
    return {lang: [parse_source(s).spec for s in sources] for lang, sources in parse_data(specs).items()}


def check_data(data: dict[str, list[str]], mix: str | None, find_files: bool, example: str) -> None:
    """`--data` and `--mix` of a text or chat stage: some data given (`example`: a --data value to suggest); with
    `find_files`, every source's files found (a Hub dataset: its commit and files, offline from the local cache), so
    a missing file or an unreachable dataset is a one-line error before any model loads; nothing is read."""
    if not data:
        raise ValueError(f"no --data given; expected LANG=SOURCE, e.g. --data {example}")
    for lang, sources in data.items():
        for source in sources if find_files else ():
            try:
                parse_source(source).list_shards()
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"--data {lang}: {e}") from None
    if mix:
        parse_mix(mix)


@dataclass(kw_only=True)
class TextDataConfig:
    """Pretraining text: sources per language and their mix (train.py and align.py)."""
    data: dict[str, list[str]] = field(default_factory=dict, metadata=option(
        "text for a language: a .jsonl, .txt or .parquet file, a directory or glob of them, or a Hugging Face Hub "
        "dataset hf://datasets/OWNER/NAME[@REVISION]/GLOB; append ?tokens=N (e.g. 50M) to read its files in order "
        "only until N tokens, ?COLUMN=VALUE to keep only matching records; repeat for more languages or sources",
        repeat=True, metavar="LANG=SOURCE", parse=data_specs, required=True))
    mix: str | None = field(default=None, metadata=option("token proportions, e.g. en:1,ko:9 (default 1:9 English:"
                                                         "target for English + one language)"))
    text_field: str = field(default="text", metadata=option("JSONL field / Parquet column holding the text",
                                                            flag="--field"))
    val_tokens: int | None = field(default=None, metadata=option("held-out tokens per language (default: 1%%, at "
                                                                "most 64 sequences)"))
    cache_dir: str | None = field(default=None, metadata=option("token cache directory (default ~/.cache/elo/data)"))
    # not an option: the pipeline checks a recipe's sources once, itself, noting Hub datasets it cannot check offline
    check_sources = True

    def validate_data(self, seq_len: int) -> None:
        check_data(self.data, self.mix, self.check_sources, "ko=ko.jsonl")
        if self.val_tokens is not None and self.val_tokens < seq_len + 1:
            raise ValueError(f"--val-tokens {self.val_tokens}: expected at least one held-out sequence "
                             f"(--seq-len + 1 = {seq_len + 1} tokens)")

    def build_source(self, tokenizer, seq_len: int, seed: int, d: distributed.Dist):
        return build_dataset(self.data, tokenizer, seq_len, parse_mix(self.mix) if self.mix else None, seed,
                             d.rank, d.world_size, cache_dir=self.cache_dir, field=self.text_field,
                             val_tokens=self.val_tokens)


def normalize_model(model: str) -> str:
    """A local model directory as an absolute path (so a run compares equal however it was spelled); else as is."""
    return str(Path(model).resolve()) if Path(model).expanduser().is_dir() else model


def check_context(seq_len: int, model: str) -> None:
    limit = load_config(resolve(model)).max_position_embeddings
    if seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {limit} tokens")


def prepare(cfg: LoopConfig, model: str) -> RunDir | None:
    """A stage's checks before any work, in one place: its options (`cfg.validate()`, mixins included), what this
    machine must have for them, `--out` against this run, and `--seq-len` against the model's context. None when
    `--resume` finds the run finished."""
    cfg.validate()
    distributed.check_cpu_offload(cfg.cpu_offload)  # this machine's CUDA: not in validate, which --plan runs anywhere
    check_not_owned(cfg.out)  # a live run there is named before anything else
    run = check_run_dir(cfg)
    if run is not None:
        check_context(cfg.seq_len, model)
    return run


@contextmanager
def run_session(cfg: LoopConfig) -> Iterator[distributed.Dist]:
    """A stage's processes joined, its `--out` owned by the main one (elo.tools.files.lock_output) before anything
    is written there; both given up however the stage ends."""
    d = distributed.init()
    try:
        if d.main:
            lock_output(cfg.out)
            check_run_dir(cfg)  # again, now that no other process can start this run beside us
        yield d
    finally:
        if d.main:
            unlock_output(cfg.out)
        distributed.close(d)


def check_run_dir(cfg: LoopConfig) -> RunDir | None:
    """Check `--out` against this run before any work; None when `--resume` finds the run already finished."""
    run = RunDir(cfg.out)
    run.check(cfg.record(), cfg.resume, cfg.VOLATILE, cfg.defaults())
    if cfg.resume and run.finished:
        print(f"{run.out} holds a finished run (its model is in {run.model}); nothing to do", flush=True)
        return None
    return run

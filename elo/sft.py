"""Stage 3, bilingual instruction tuning (`sft.py`): optionally add a chat vector, then fine-tune on chat data
(target language and English 1:1 by conversations) with the loss on assistant turns only, on the shared loop.

The only difference from pretraining is the batch source (elo.data.chat_data: conversations rendered through the
model's chat template, untrained tokens with target -1, each micro-batch packed into one row whose
conversations the model computes one by one); the model part is the full model (or LoRA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from elo.chat_vector import add_chat_vector
from elo.data.chat_data import build_chat_source
from elo.data.text import parse_mix
from elo.hf.tokenizer import load_tokenizer
from elo.tools.cli import option, parse_config
from elo.tools.files import MARKER
from elo.train import distributed
from elo.train.build import full_spec, materialize
from elo.train.loop import fit
from elo.train.options import LoRAOptions, LoopConfig, check_data, data_specs, normalize_model, prepare, run_session


@dataclass(kw_only=True)
class SFTConfig(LoopConfig, LoRAOptions):
    model: str = field(metadata=option("the model to tune: align.py's output (runs/align-ko/model), a directory or "
                                      "a hub id"))
    data: dict[str, list[str]] = field(default_factory=dict, metadata=option(
        "chat data for a language, ShareGPT 'conversations' or OpenAI 'messages' records: a .jsonl or .parquet file, "
        "a directory or glob of them, or a Hugging Face Hub dataset hf://datasets/OWNER/NAME[@REVISION]/GLOB; append "
        "?COLUMN=VALUE to keep only matching records (e.g. ?language=Korean); repeat for more",
        repeat=True, metavar="LANG=SOURCE", parse=data_specs, required=True))
    mix: str | None = field(default=None, metadata=option("conversation proportions, e.g. ko:1,en:1 (default equal)"))
    val_conversations: int | None = field(default=None, metadata=option(
        "held-out conversations per language (default 1%%, at least 1, at most 128)"))
    epochs: float | None = field(default=None, metadata=option("passes over the training conversations, instead of "
                                                              "--max-steps"))
    max_steps: int | None = field(default=None, metadata=option("optimizer steps (or give --epochs)"))
    lr: float = field(default=1e-5, metadata=option("peak learning rate"))
    warmup_steps: int = field(default=10, metadata=option("linear warmup steps"))
    chat_vector_base: str | None = field(default=None, metadata=option(
        "add the chat vector (instruct - base) first: the pretrained model it comes from"))
    chat_vector_instruct: str | None = field(default=None, metadata=option("... and its instruct model"))
    chat_vector_ratio: float = field(default=1.0, metadata=option("scale of the chat vector"))
    check_sources = True  # not an option: as TextDataConfig.check_sources

    def validate(self) -> None:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give either --epochs or --max-steps, not both")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give the length of the run: --epochs E or --max-steps S")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--epochs {self.epochs}: expected a positive number")
        if bool(self.chat_vector_base) != bool(self.chat_vector_instruct):
            raise ValueError("a chat vector needs both --chat-vector-base and --chat-vector-instruct")
        if not math.isfinite(self.chat_vector_ratio):
            raise ValueError(f"--chat-vector-ratio {self.chat_vector_ratio}: expected a finite number")
        self.validate_lora()
        if self.val_conversations is not None and self.val_conversations < 1:
            raise ValueError(f"--val-conversations {self.val_conversations}: expected a positive integer")
        super().validate()
        check_data(self.data, self.mix, self.check_sources, "ko=ko_chats.jsonl")
        self.model = normalize_model(self.model)

    def record(self) -> dict:
        record = super().record()
        if self.epochs is not None:  # the steps follow from the data; --epochs identifies the run
            record.pop("max_steps")
        return record


def sft(cfg: SFTConfig) -> Path:
    """Run (or resume) SFT; returns the directory of the tuned chat model."""
    if prepare(cfg, cfg.model) is None:
        return Path(cfg.out) / "model"
    provenance = {"stage": "sft", "model": cfg.model, "chat_vector": {
        "base": cfg.chat_vector_base, "instruct": cfg.chat_vector_instruct, "ratio": cfg.chat_vector_ratio}
        if cfg.chat_vector_base else None, "data": cfg.data, "mix": cfg.mix, "seed": cfg.seed, "seq_len": cfg.seq_len}
    with run_session(cfg) as d:
        model_dir = cfg.model
        if cfg.chat_vector_base:  # written once by the main process, in the run directory, before anything reads it
            model_dir = str(Path(cfg.out) / "chat_vector")
            if d.main and not (Path(model_dir) / MARKER).is_file():
                print(f"chat vector: {cfg.model} + {cfg.chat_vector_ratio} * ({cfg.chat_vector_instruct} - "
                      f"{cfg.chat_vector_base}) -> {model_dir}", flush=True)
                add_chat_vector(cfg.model, cfg.chat_vector_base, cfg.chat_vector_instruct, model_dir,
                                cfg.chat_vector_ratio)
            distributed.barrier(d)
        source, info = build_chat_source(cfg.data, load_tokenizer(model_dir), cfg.seq_len,
                                         parse_mix(cfg.mix) if cfg.mix else None, cfg.seed, d.rank, d.world_size,
                                         cfg.val_conversations)
        if cfg.epochs is not None:
            conversations = sum(i.train for i in info.values())
            per_step = cfg.batch_size * cfg.grad_accum * d.world_size
            cfg.max_steps = max(1, math.ceil(cfg.epochs * conversations / per_step))
            if d.main:
                print(f"sft: {cfg.epochs} epoch(s) of {conversations:,} conversations = {cfg.max_steps} steps",
                      flush=True)
        spec = cfg.with_lora(full_spec(model_dir), cfg.seed)
        model = materialize(spec, d, cfg.activation_checkpointing, cfg.compile, cfg.cpu_offload)
        return fit(cfg, model, spec, source, d, "sft", provenance)


def main(argv: list[str] | None = None) -> None:
    sft(parse_config(SFTConfig, argv, "ELO stage 3: (chat vector, then) supervised fine-tuning on chat data with "
                                      "the loss on assistant turns only."))

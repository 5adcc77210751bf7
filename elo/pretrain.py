"""Stage 1, ELO pretraining (`train.py`), and the full fine-tuning and LoRA baselines, on the shared loop.

The model part: the ELO submodel (`--layers 1,32`), the whole model (`--layers all`) or LoRA (`--lora-rank R`).
The batch source: text windows of each language in a fixed mix (elo.data). Output: `--out/model`, for ELO the
2-layer submodel whose config records its base (ready for align.py or elo.splice_checkpoint), else a full HF model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from elo import distributed
from elo.builders import LoRAOptions, ModelSpec, elo_spec, full_spec
from elo.checkpoint import load_config, resolve
from elo.cli import ArgumentParser, add_dataclass_options, option
from elo.data import build_dataset, parse_data, parse_mix
from elo.default_model import DEFAULT_MODEL
from elo.run_dir import RunDir
from elo.trainer import LoopConfig, check_run_dir, run_stage


def _data_specs(specs: list[str]) -> dict[str, list[str]]:
    """Repeated `--data LANG=PATH` -> {lang: [absolute paths]}; a repeated language adds files."""
    return {lang: [str(p.resolve()) for p in paths] for lang, paths in parse_data(specs).items()}


@dataclass(kw_only=True)
class TextDataConfig:
    """Pretraining text: files per language and their mix (train.py and align.py)."""
    data: dict[str, list[str]] = field(default_factory=dict, metadata=option(
        "text for a language (JSONL or .txt); repeat for more languages or files", repeat=True,
        metavar="LANG=PATH", parse=_data_specs, required=True))
    mix: str | None = field(default=None, metadata=option("token proportions, e.g. en:1,ko:9 (default 1:9 English:"
                                                         "target for English + one language)"))
    text_field: str = field(default="text", metadata=option("JSONL field holding the text", flag="--field"))
    val_tokens: int | None = field(default=None, metadata=option("held-out tokens per language (default: 1%%, at "
                                                                "most 64 sequences)"))
    cache_dir: str | None = field(default=None, metadata=option("token cache directory (default ~/.cache/elo/data)"))

    def validate_data(self, seq_len: int) -> None:
        if not self.data:
            raise ValueError("no --data given; expected LANG=PATH, e.g. --data ko=ko.jsonl")
        for lang, files in self.data.items():
            for f in files:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"--data {lang}={f}: "
                                            + ("is a directory; expected a .jsonl or .txt file" if Path(f).is_dir()
                                               else "file not found"))
        if self.mix:
            parse_mix(self.mix)
        if self.val_tokens is not None and self.val_tokens < seq_len + 1:
            raise ValueError(f"--val-tokens {self.val_tokens}: expected at least one held-out sequence "
                             f"(--seq-len + 1 = {seq_len + 1} tokens)")

    def build_source(self, tokenizer, seq_len: int, seed: int, d: distributed.Dist):
        return build_dataset(self.data, tokenizer, seq_len, parse_mix(self.mix) if self.mix else None, seed,
                             d.rank, d.world_size, cache_dir=self.cache_dir, field=self.text_field,
                             val_tokens=self.val_tokens)


@dataclass(kw_only=True)
class TrainConfig(LoopConfig, TextDataConfig, LoRAOptions):
    model: str = field(default=DEFAULT_MODEL, metadata=option("HF model directory, hub id, or the offline default"))
    layers: str = field(default="1,-1", metadata=option("1-based decoder layers to detach and train (ELO), e.g. "
                                                       "1,32; 'all': full fine-tuning"))
    train_embeddings: bool = field(default=False, metadata=option("ELO: also train embedding, final norm and head"))

    @property
    def mode(self) -> str:
        if self.lora_rank > 0:
            return "lora"
        return "full" if self.layers == "all" else "elo"

    def validate(self) -> None:
        super().validate()
        self.validate_data(self.seq_len)
        self.model = normalize_model(self.model)
        self.validate_lora()
        if self.mode == "lora" and self.layers not in ("all", "1,-1"):
            raise ValueError(f"--lora-rank trains adapters on every layer; drop --layers {self.layers} or use 'all'")

    def model_spec(self) -> ModelSpec:
        """The model part: cheap to build (reads the config and two small tensors), so errors come early."""
        if self.mode == "elo":
            if self.layers == "all":
                raise ValueError("--layers all is full fine-tuning")
            return elo_spec(self.model, self.layers, self.train_embeddings)
        return self.with_lora(full_spec(self.model), self.seed)


def normalize_model(model: str) -> str:
    """A local model directory as an absolute path (so a run compares equal however it was spelled); else as is."""
    return str(Path(model).resolve()) if Path(model).expanduser().is_dir() else model


def check_context(seq_len: int, model: str) -> None:
    limit = load_config(resolve(model)).max_position_embeddings
    if seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {limit} tokens")


def parse_config(cls, argv: list[str] | None, description: str):
    """A stage config from the command line: one option per dataclass field."""
    import dataclasses

    p = ArgumentParser(description=description)
    add_dataclass_options(p, cls)
    a = vars(p.parse_args(argv))
    a.pop("debug")
    for f in dataclasses.fields(cls):
        if "parse" in f.metadata and f.name in a:
            a[f.name] = f.metadata["parse"](a[f.name])
    return cls(**a)


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, argv, "ELO pretraining (and the full fine-tuning / LoRA baselines).")


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) pretraining; returns the directory of the trained model."""
    from elo.tokenizer import load_tokenizer

    cfg.validate()
    run = check_run_dir(cfg)
    if run is None:
        return RunDir(cfg.out).model
    check_context(cfg.seq_len, cfg.model)
    spec = cfg.model_spec()
    tokenizer = load_tokenizer(cfg.model)
    provenance = {"stage": "pretrain", "mode": cfg.mode, "model": cfg.model, "layers": cfg.layers, "data": cfg.data,
                  "seed": cfg.seed, "seq_len": cfg.seq_len, "mix": cfg.mix, "val_tokens": cfg.val_tokens}
    return run_stage(cfg, lambda: spec, lambda d: cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, d)[0], cfg.mode,
                     provenance)


def main(argv: list[str] | None = None) -> None:
    train(config_from_args(argv))

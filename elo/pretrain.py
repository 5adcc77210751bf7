"""Stage 1, ELO pretraining (`train.py`), and the full fine-tuning and LoRA baselines, on the shared loop.

The model part: the ELO submodel (`--layers 1,32`), the whole model (`--layers all`) or LoRA (`--lora-rank R`).
The batch source: text windows of each language in a fixed mix (elo.data.text). Output: `--out/model`, for ELO the
2-layer submodel whose config records its base (ready for align.py or elo.splice_checkpoint), else a full HF model.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elo.train import distributed
from elo.train.build import LoRAOptions, ModelSpec, check_context, elo_spec, full_spec, normalize_model
from elo.tools.cli import option, parse_config
from elo.data.text import build_dataset, parse_data, parse_mix
from elo.hf.default_model import DEFAULT_MODEL
from elo.train.run_dir import RunDir
from elo.train.loop import LoopConfig, check_run_dir, run_stage


def data_specs(specs: list[str]) -> dict[str, list[str]]:
    """Repeated `--data LANG=PATH` -> {lang: [absolute paths]}; a repeated language adds files."""
    return {lang: [str(p.resolve()) for p in paths] for lang, paths in parse_data(specs).items()}


@dataclass(kw_only=True)
class TextDataConfig:
    """Pretraining text: files per language and their mix (train.py and align.py)."""
    data: dict[str, list[str]] = field(default_factory=dict, metadata=option(
        "text for a language (JSONL or .txt); repeat for more languages or files", repeat=True,
        metavar="LANG=PATH", parse=data_specs, required=True))
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
    middle: str | None = field(default=None, metadata=option(
        "ELO: put a frozen fitted surrogate of the skipped middle layers between the chosen ones ('linear'), so the "
        "upper layer trains on inputs like those it sees in the full model"))
    middle_tokens: int = field(default=12000, metadata=option("tokens of the training mix the surrogate is fitted on"))

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
        self.auto_layers()
        if self.middle is not None:
            from elo.extensions.middle import KINDS

            if self.middle not in KINDS:
                raise ValueError(f"--middle {self.middle!r}: expected one of {', '.join(KINDS)}")
            if self.mode != "elo":
                raise ValueError("--middle stands in for the layers ELO skips; it needs ELO mode (--layers 1,32)")
        if self.mode == "lora" and self.layers not in ("all", "1,-1"):
            raise ValueError(f"--lora-rank trains adapters on every layer; drop --layers {self.layers} or use 'all'")

    def auto_layers(self) -> int | None:
        """K of `--layers auto:K` (None for explicit layers)."""
        if not self.layers.startswith("auto:"):
            return None
        k = self.layers.removeprefix("auto:")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"--layers {self.layers!r}: expected auto:K with K a positive integer")
        return int(k)

    def model_spec(self) -> ModelSpec:
        """The model part: cheap to build (reads the config and two small tensors), so errors come early."""
        if self.mode == "elo":
            if self.layers == "all":
                raise ValueError("--layers all is full fine-tuning")
            return elo_spec(self.model, self.layers, self.train_embeddings)
        return self.with_lora(full_spec(self.model), self.seed)


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, argv, "ELO pretraining (and the full fine-tuning / LoRA baselines).")


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) pretraining; returns the directory of the trained model."""
    from elo.hf.tokenizer import load_tokenizer

    cfg.validate()
    run = check_run_dir(cfg)
    if run is None:
        return RunDir(cfg.out).model
    check_context(cfg.seq_len, cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    auto = cfg.layers.startswith("auto:")
    if auto:
        cfg.layers, scores = suggest_layers(cfg, tokenizer)
    spec = cfg.model_spec()
    if cfg.middle:
        check_middle(cfg, spec)
    provenance = {"stage": "pretrain", "mode": cfg.mode, "model": cfg.model, "layers": cfg.layers, "data": cfg.data,
                  "seed": cfg.seed, "seq_len": cfg.seq_len, "mix": cfg.mix, "val_tokens": cfg.val_tokens,
                  "middle": cfg.middle}
    if auto:
        provenance["layer_scores"] = scores
        cfg.layers = f"auto:{len(scores['suggested'])}"  # the run's identity stays what was asked for
    layers = spec.config.elo["layers"] if cfg.mode == "elo" else None  # 1-based, resolved
    before = (lambda model, source, d, fresh: attach_fitted_middle(cfg, layers, model, tokenizer, d)) \
        if cfg.middle else None
    return run_stage(cfg, lambda: spec, lambda d: cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, d)[0], cfg.mode,
                     provenance, before)


def suggest_layers(cfg: TrainConfig, tokenizer) -> tuple[str, dict]:
    """`--layers auto:K`: the K layers `elo.extensions.layer_scores` suggests from the held-out text of the run's languages."""
    from elo.hf.checkpoint import load_model
    from elo.extensions.layer_scores import layer_scores

    k = cfg.auto_layers()
    source, _ = cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, distributed.Dist(0, 1, torch.device("cpu")))
    batches = {lang: list(itertools.islice(source.val_batches(lang, cfg.batch_size), cfg.eval_batches))
               for lang in source.langs}
    scores = layer_scores(load_model(cfg.model), batches, k=k)
    layers = ",".join(map(str, scores.suggested))
    if distributed.rank_from_env() == 0:
        print(f"--layers auto:{k}: layer scores from held-out text\n{scores.table()}\nchosen layers: {layers}",
              flush=True)
    return layers, {"suggested": scores.suggested, "influence": scores.influence, "shift": scores.shift}


def check_middle(cfg: TrainConfig, spec: ModelSpec) -> None:
    """--middle's cheap checks, before any data or weights are read."""
    ids = spec.config.layer_ids
    if not any(b - a > 1 for a, b in zip(ids, ids[1:])):
        raise ValueError(f"--middle needs at least two chosen layers with layers between them; --layers {cfg.layers} "
                         f"leaves no gap to stand in for")
    if cfg.middle_tokens < spec.config.hidden_size + 1:
        raise ValueError(f"--middle-tokens {cfg.middle_tokens}: too few to fit a {spec.config.hidden_size}-wide map; "
                         f"expected at least {spec.config.hidden_size + 1}")


def attach_fitted_middle(cfg: TrainConfig, layers: list[int], model, tokenizer, d: distributed.Dist) -> dict:
    """Fit the surrogate once (rank 0, on the first tokens of the training mix, kept in the run directory so a
    resumed run gets it bit for bit), then attach it to every process's submodel."""
    from elo.extensions.middle import MIDDLE_NAME, attach_middle, fit_middle, load_middle, save_middle

    directory = Path(cfg.out) / "checkpoints"
    if d.main and not (directory / MIDDLE_NAME).is_file():
        stream, _ = cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, distributed.Dist(0, 1, torch.device("cpu")))
        surrogate = fit_middle(cfg.model, layers, (stream.next_batch(cfg.batch_size) for _ in itertools.count()),
                               tokens=cfg.middle_tokens, kind=cfg.middle, device=d.device)
        directory.mkdir(parents=True, exist_ok=True)
        save_middle(surrogate, directory)
    distributed.barrier(d)
    surrogate = load_middle(directory, d.device)
    attach_middle(model, surrogate)
    if d.main:
        print(f"middle surrogate ({cfg.middle}) attached: {surrogate.stats}", flush=True)
    return {"middle_r2": surrogate.stats.get("r2")}


def main(argv: list[str] | None = None) -> None:
    train(config_from_args(argv))

"""Stage 2, layer replacement and alignment (`align.py`): splice the trained ELO layers into the base while loading,
then fine-tune the whole model briefly on fresh bilingual text, on the shared loop.

Without alignment, layers 1 and n, trained to feed each other directly, sit around middle layers that never saw
their new outputs; the paper (Fig. 2) spends 1 GB of alignment after 9 GB of ELO, so the default budget here is 1/9
of the ELO run's tokens. When `--elo` is a train.py run directory over the same data, seed and split, alignment
continues that run's data stream where it stopped, so no ELO sequence is seen again.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from elo.data.sources import source_digests
from elo.hf.checkpoint import load_config
from elo.hf.tokenizer import load_tokenizer
from elo.surgery import splice_checkpoint
from elo.tools.cli import option, parse_config, parse_count
from elo.train import distributed
from elo.train.build import full_spec, materialize, spliced_spec, train_only_layers
from elo.train.loop import fit, resuming, validation_loss
from elo.train.options import LoRAOptions, LoopConfig, TextDataConfig, normalize_model, prepare, run_session


@dataclass(kw_only=True)
class AlignConfig(LoopConfig, TextDataConfig, LoRAOptions):
    elo: str = field(metadata=option("a train.py ELO run directory, or an ELO submodel directory"))
    base: str | None = field(default=None, metadata=option("the base model (default: the one the submodel records)"))
    tokens: str | None = field(default=None, metadata=option(
        "alignment budget: a count (300M, 2.5e6) or a percentage of the ELO run's tokens (11%%); default 1/9 of "
        "them, the paper's 1 GB after 9 GB"))
    max_steps: int | None = field(default=None, metadata=option("optimizer steps instead of --tokens"))
    warmup_steps: int | None = field(default=None, metadata=option(
        "linear warmup steps (default: a tenth of the steps, at least 1, so a short budget leaves warmup)"))
    lr: float = field(default=2e-5, metadata=option("peak learning rate"))
    train_layers: str | None = field(default=None, metadata=option(
        "train only these 1-based decoder layers (all still compute), e.g. 1,2,29,30; default: the whole model"))
    save_spliced: bool = field(default=False, metadata=option("also write the spliced model, before alignment, to "
                                                             "--out/spliced (streamed)"))
    control: bool = field(default=False, metadata=option(
        "the alignment-only control: train the base itself, without the ELO layers, on exactly the tokens alignment "
        "would see (so a gain after alignment can be credited to ELO or not)"))

    def validate(self) -> None:
        super().validate()
        self.validate_data(self.seq_len)
        self.validate_lora()
        if self.control and self.save_spliced:
            raise ValueError("--control trains the base without the ELO layers: there is no spliced model to save")
        if self.lora_rank and self.train_layers:
            raise ValueError("--lora-rank and --train-layers are alternatives; give one")
        if self.train_layers is not None and not self.train_layers.strip(","):
            raise ValueError(f"--train-layers {self.train_layers!r}: expected 1-based layer numbers such as 1,2,29,30 "
                             f"(leave it out to train the whole model)")


@dataclass(frozen=True)
class EloInput:
    submodel: Path  # the submodel directory
    run: dict | None  # the ELO run's provenance (elo_run.json), when --elo is a run directory


def find_submodel(path: str) -> EloInput:
    """`--elo`: a train.py run directory (its model/) or a submodel directory; one-line errors otherwise."""
    p = Path(path)
    sub = p / "model" if (p / "model" / "config.json").is_file() else p
    if not (sub / "config.json").is_file():
        raise ValueError(f"--elo {path} holds no ELO submodel: expected a train.py run directory (with model/) "
                         f"or a submodel directory (config.json with an 'elo' record)")
    config = load_config(sub)
    if config.elo is None:
        raise ValueError(f"--elo {path}: {sub / 'config.json'} has no 'elo' record; it is not an ELO submodel "
                         f"(was the run trained with --layers all or --lora-rank?)")
    record = sub / "elo_run.json"
    run = json.loads(record.read_text()) if sub != p and record.is_file() else None
    return EloInput(sub, run)


def parse_tokens(spec: str, elo_tokens: int | None) -> int:
    """`300M`, `2.5e6`, `40000` or `11%` (of the ELO run's tokens) -> a positive token count."""
    spec = spec.strip()
    if spec.endswith("%"):
        try:
            pct = float(spec[:-1])
        except ValueError:
            raise ValueError(f"--tokens {spec!r}: expected a count (300M, 2.5e6) or a percentage (11%)") from None
        if elo_tokens is None:
            raise ValueError(f"--tokens {spec}: a percentage needs --elo to be a train.py run directory (its "
                             f"trained tokens are the 100%)")
        count = elo_tokens * pct / 100
    else:
        count = parse_count(spec)
        if count is None:
            raise ValueError(f"--tokens {spec!r}: expected a count (300M, 2.5e6, 40000) or a percentage (11%)")
    if not (math.isfinite(count) and count >= 1):
        raise ValueError(f"--tokens {spec}: expected a positive budget (at least one token)")
    return int(count)


def budget_tokens(tokens: str | None, elo_tokens: int | None) -> int:
    """Alignment's token budget, the one rule the pipeline and its baselines share: `--tokens` (a count, or a
    percentage of the ELO run's tokens), else 1/9 of the ELO run's tokens (the paper's 1 GB after 9 GB)."""
    return parse_tokens(tokens, elo_tokens) if tokens is not None else max(1, elo_tokens // 9)


def plan(cfg: AlignConfig, world_size: int) -> tuple[EloInput, int | None]:
    """Check every input and settle the step count for `world_size` processes (cheap: configs and two small
    tensors); returns the ELO input and the token budget (None when --max-steps gave the steps)."""
    elo = find_submodel(cfg.elo)
    recorded = load_config(elo.submodel).elo["base"]
    cfg.base = normalize_model(cfg.base or recorded or "")
    if not cfg.base:
        raise ValueError(f"the submodel in {elo.submodel} records no base model; pass --base")
    if cfg.tokens is not None and cfg.max_steps is not None:
        raise ValueError("give either --tokens or --max-steps, not both")
    budget = None
    if cfg.max_steps is None:
        elo_tokens = elo.run["tokens"] if elo.run else None
        if cfg.tokens is None and elo_tokens is None:
            raise ValueError(f"--elo {cfg.elo} is a submodel directory, not a run directory: give the alignment "
                             f"budget with --tokens or --max-steps")
        budget = budget_tokens(cfg.tokens, elo_tokens)
        per_step = cfg.batch_size * cfg.grad_accum * world_size * cfg.seq_len
        cfg.max_steps = max(1, math.ceil(budget / per_step))
    if cfg.warmup_steps is None:
        cfg.warmup_steps = max(1, cfg.max_steps // 10)
    return elo, budget


def continues_elo_stream(cfg: AlignConfig, run: dict | None) -> bool:
    """Whether alignment draws from the same stream as the ELO run (so it can start where that run stopped)."""
    if run is None:
        return False
    same = {"data": cfg.data, "seed": cfg.seed, "seq_len": cfg.seq_len, "mix": cfg.mix, "val_tokens": cfg.val_tokens}
    return all(run.get(k) == v for k, v in same.items())


def align(cfg: AlignConfig) -> Path:
    """Run (or resume) alignment; returns the directory of the aligned full model."""
    elo, budget = plan(cfg, distributed.world_size_from_env())
    if prepare(cfg, cfg.base) is None:
        return Path(cfg.out) / "model"
    spec = full_spec(cfg.base) if cfg.control else spliced_spec(cfg.base, elo.submodel)
    if cfg.train_layers:
        spec = train_only_layers(spec, cfg.train_layers)
    spec = cfg.with_lora(spec, cfg.seed)
    tokenizer = load_tokenizer(cfg.base)
    continuing = continues_elo_stream(cfg, elo.run)
    provenance = {"stage": "align", "base": cfg.base, "elo_submodel": str(elo.submodel.resolve()),
                  "elo_layers": load_config(elo.submodel).elo["layers"], "data": cfg.data, "seed": cfg.seed,
                  "seq_len": cfg.seq_len, "mix": cfg.mix, "val_tokens": cfg.val_tokens,
                  "continued_elo_stream": continuing, "control": cfg.control, "train_layers": cfg.train_layers,
                  "lora_rank": cfg.lora_rank,
                  "data_digests": _digests(cfg.data)}
    with run_session(cfg) as d:
        source, _ = cfg.build_source(tokenizer, cfg.seq_len, cfg.seed, d)
        model = materialize(spec, d, cfg.activation_checkpointing, cfg.compile, cfg.cpu_offload)
        if d.main:
            how = (f"continuing the ELO run's data stream at sequence {elo.run['data_state']['position']:,} "
                   f"(no ELO sequence is seen again)" if continuing else
                   f"drawing its own stream with seed {cfg.seed} (the data, seed or split differ from the ELO run)")
            what = "the base alone (control, no ELO layers)" if cfg.control else "the spliced model"
            print(f"align: {cfg.max_steps} steps of {what}" + (f" for a budget of {budget:,} tokens" if budget else "")
                  + f"; {how}", flush=True)
        if continuing:
            source.load_state_dict(elo.run["data_state"])
        base_loss = None
        if not resuming(cfg):  # once per run: the spliced model on disk, and the base's loss to compare against
            if cfg.save_spliced and d.main:
                splice_checkpoint(cfg.base, elo.submodel, Path(cfg.out) / "spliced")
            base = materialize(full_spec(cfg.base), d)
            base_loss = validation_loss(base, source, cfg.batch_size, cfg.eval_batches, d.device, "base_val_loss")
            del base
        return fit(cfg, model, spec, source, d, "align", provenance, base_loss)


def _digests(data: dict[str, list[str]]) -> dict[str, str]:
    """Each local data file's sha256, each Hub dataset's commit."""
    return source_digests(source for sources in data.values() for source in sources)


def main(argv: list[str] | None = None) -> None:
    align(parse_config(AlignConfig, argv, "ELO stage 2: splice the trained layers into the base and align the "
                                          "whole model on fresh bilingual text."))

"""The small-scale reproduction of the paper (issue 12) and the surrogate arms (issue 14) on SmolLM2-135M-Instruct.

    python studies/smollm2-ko/run.py [ARM ...] [--out runs/smollm2-ko]   # run or resume arms, in the order below
    python studies/smollm2-ko/results.py                                  # RESULTS.md + figures from results/*.json

Each arm is one recipe in recipes/, trained by `pipeline.py` (its printed command reproduces it), then scored by
`evaluate.py` with the same arguments for every model: NLL per token on text no arm trained on (100 news sentence
pairs of the Korean-English parallel corpus, both sides; for the Japanese arms 200 turns of the Japanese-English
business dialogues) and, for the headline models, the benchmarks cut to LIMIT examples per task. Hyperparameters
are chosen on the ELO runs' own held-out Wikipedia windows (the validation split), never on these.

An arm whose results/<arm>.json exists is skipped; an interrupted arm resumes (the pipeline resumes its stage). An
arm whose recipe has the same model, data and [train] table as an arm already run starts from a hard-linked copy of
that ELO run instead of training it again (the pipeline checks the copy's arguments and skips the stage).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from elo.pipeline import resources  # noqa: E402
from elo.pretrain import LayerChoice, MiddleChoice, TrainConfig  # noqa: E402
from elo.tools.files import atomic_write_text  # noqa: E402
from elo.train.flops import train_flops_per_token  # noqa: E402
from elo.tools.jsonl import read_jsonl  # noqa: E402

MODEL = "smollm2-135m-instruct"
KOBEST = "kobest_boolq,kobest_copa,kobest_hellaswag,kobest_sentineg,kobest_wic"
KOBEST_LIMIT, MMLU_LIMIT, JCQA_LIMIT = 50, 10, 100  # examples per task (MMLU: per subject, 12 subjects)
LR_SWEEP = ("elo-lr6e-6", "elo-lr2e-5", "elo-lr6e-5", "elo-lr2e-4")
FFT_BUDGETS = ("2.5", "5", "10", "25", "50", "100")  # % of N (E3)
SCALE_TOKENS = ("0.4M", "1.2M", "4M")  # ELO tokens of the token-scaling arms
ENDS = ("ends-4", "embed", "ends-6")  # (1,2,29,30); (1,30) + --train-embeddings; (1,2,3,28,29,30)


@dataclass
class Arm:
    name: str
    recipe: str | None  # recipes/<recipe>; None: the base model, evaluated only
    models: dict[str, str]  # label -> the model's path inside the arm's run directory (or the base's name)
    benchmarks: tuple[str, ...] = ()  # labels also scored on the benchmarks
    lang: str = "ko"
    uses_choice: bool = False  # trains ELO at the learning rate the sweep chose (checked before it runs)
    timed: bool = False  # trains its own ELO run (never a copy), so its stages' times compare with each other
    notes: dict = field(default_factory=dict)


ALIGNED = {"elo+align": "align/model", "elo spliced": "align/spliced"}
ARMS = [
    Arm("base", None, {"base": MODEL}, ("base",)),
    Arm("base-ja", None, {"base": MODEL}, ("base",), lang="ja"),
    *[Arm(n, f"{n}.toml", ALIGNED) for n in LR_SWEEP],
    Arm("table1", "table1.toml", ALIGNED | {"fft": "fft/model", "lora": "lora/model"},
        ("elo+align", "elo spliced", "fft", "lora"), uses_choice=True, timed=True),
    Arm("control", "control.toml", {"align only": "align/model"}, ("align only",), uses_choice=True),
    Arm("surrogate", "surrogate.toml", ALIGNED, ("elo+align", "elo spliced"), uses_choice=True),
    # the mechanism arms run at lr 6e-5: at the chosen rate ELO leaves the layers nearly as they were (RESULTS.md)
    *[Arm(f"align-{p}", f"align-{p}.toml", {"elo+align": "align/model"}) for p in ("2.5", "5", "20")],
    *[Arm(f"layers-{s}", f"layers-{s}.toml", ALIGNED) for s in ("8-23", "1-15", "1-15-30", "auto")],
    Arm("align-layers", "align-layers.toml", {"elo+align": "align/model"}),
    Arm("align-lora", "align-lora.toml", {"elo+align": "align/model"}),
    *[Arm(f"ratio-{r}", f"ratio-{r}.toml", ALIGNED) for r in ("0-1", "1-1")],
    *[Arm(f"surrogate-lr{lr}", f"surrogate-lr{lr}.toml", ALIGNED) for lr in ("6e-5", "2e-4")],
    Arm("seed1-elo", "seed1-elo.toml", ALIGNED, uses_choice=True),
    Arm("seed1-control", "seed1-control.toml", {"align only": "align/model"}, uses_choice=True),
    Arm("seed1-surrogate", "seed1-surrogate.toml", ALIGNED, uses_choice=True),
    Arm("seed1-fft", "seed1-fft.toml", {"fft": "train/model"}),
    # issue 21, E1: the headroom any stand-in for the middle could reach (ELO's oracle, --in-situ)
    *[Arm(f"oracle-lr{lr}", f"oracle-lr{lr}.toml", ALIGNED) for lr in ("2e-5", "6e-5", "2e-4", "6e-4")],
    # E3: the compute-matched frontier, full fine-tuning from the base at 2.5% to 100% of N, three data orders (100%
    # at orders 0 and 1 are table1's [fft] and seed1-fft), with E1's replicates and a third control between them
    *[Arm(f"fft-{p}-s0", f"fft-{p}-s0.toml", {"fft": "train/model"}) for p in FFT_BUDGETS[:-1]],
    Arm("oracle-lr2e-4-s1", "oracle-lr2e-4-s1.toml", ALIGNED),
    *[Arm(f"fft-{p}-s1", f"fft-{p}-s1.toml", {"fft": "train/model"}) for p in FFT_BUDGETS[:-1]],
    Arm("seed2-control", "seed2-control.toml", {"align only": "align/model"}, uses_choice=True),
    *[Arm(f"fft-{p}-s2", f"fft-{p}-s2.toml", {"fft": "train/model"}) for p in FFT_BUDGETS],
    Arm("oracle-lr2e-4-s2", "oracle-lr2e-4-s2.toml", ALIGNED),
    # E2: the gradient fidelity of both end layers along ELO's training, per stand-in of the middle
    *[Arm(f"e2-{m}", f"e2-{m}.toml", ALIGNED) for m in ("plain", "linear", "distilled")],
    # token scaling: the linear-surrogate arm on 0.4M, 1.2M and 4M ELO tokens, alignment fixed
    *[Arm(f"scale-{t}", f"scale-{t}.toml", ALIGNED) for t in SCALE_TOKENS],
    # more ends, and the embeddings, each beside its own oracle
    *[Arm(f"{o}{e}", f"{o}{e}.toml", ALIGNED) for e in ENDS for o in ("", "oracle-")],
    # E1 again: the oracle's rate chosen on validation (6e-4) at two more data orders, and the next rate up
    *[Arm(f"oracle-lr6e-4-s{s}", f"oracle-lr6e-4-s{s}.toml", ALIGNED) for s in (1, 2)],
    Arm("oracle-lr2e-3", "oracle-lr2e-3.toml", ALIGNED),
    Arm("ja", "ja.toml", {"elo+align": "align/model", "elo spliced": "align/spliced", "fft": "fft/model"},
        ("elo+align", "fft"), lang="ja", uses_choice=True, timed=True),
]


def test_text(out: Path, lang: str) -> dict[str, Path]:
    """The scored text, written once under the run directory (derived from ../shared/data; never committed)."""
    pairs, n, field_ = (("ko_en.jsonl", 100, "ko") if lang == "ko" else ("ja_en.jsonl", 200, "ja"))
    rows = [r for _, r in read_jsonl(DATA / "parallel" / pairs)][:n]
    files = {}
    for key in (field_, "en"):
        path = out / "test_text" / f"{lang}-{key}.jsonl"
        if not path.is_file():
            docs = [" ".join(r[key] for r in rows[i:i + 10]) for i in range(0, len(rows), 10)]  # 10 lines per doc
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        files[key] = path
    return files


def recipe_of(arm: Arm) -> dict:
    return tomllib.loads((HERE / "recipes" / arm.recipe).read_text(encoding="utf-8"))


def chosen_lr() -> float:
    """The ELO learning rate with the lowest Korean validation loss after alignment (the sweep's arms)."""
    losses = {}
    for name in LR_SWEEP:
        path = HERE / "results" / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"the learning-rate sweep is not finished ({path} missing); run it first")
        r = json.loads(path.read_text())
        losses[r["lr"]] = r["stages"]["align"]["val_loss"]["val_loss/ko"]
    return min(losses, key=losses.get)


def seed_elo_run(arm: Arm, out: Path) -> None:
    """Start from a hard-linked copy of an identical ELO run of an earlier arm, when there is one."""
    mine = recipe_of(arm)
    target = out / arm.name / "train"
    if arm.timed or "train" not in mine or target.exists():
        return
    for other in ARMS:
        if other is arm or other.recipe is None or not (out / other.name / "train" / "model" / ".elo-output").is_file():
            continue
        theirs = recipe_of(other)
        if all(mine.get(k) == theirs.get(k) for k in ("model", "nproc", "data", "train")):
            print(f"{arm.name}: starting from {other.name}'s ELO run (the same recipe [train]); copying it", flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            # what marks a pipeline run directory (the pipeline writes the same file when it starts)
            shutil.copy(HERE / "recipes" / arm.recipe, target.parent / "recipe.toml")
            shutil.copytree(out / other.name / "train", target, copy_function=os.link,
                            ignore=shutil.ignore_patterns("checkpoints"))
            return


def run_logged(command: list[str], log: Path) -> None:
    print("$ " + shlex.join(command), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {shlex.join(command)}\n")
        f.flush()
        code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"failed (exit status {code}): {shlex.join(command)}; see {log}")


def evaluate(model: str, label: str, arm: Arm, out: Path, log: Path) -> tuple[list[list[str]], dict]:
    """NLL per language on the test text, and the benchmarks for a headline model; the commands and results."""
    files = test_text(out, arm.lang)
    safe = label.replace(" ", "_").replace("+", "_")
    scored = out / "scores" / arm.name / f"{safe}.json"
    base = [sys.executable, "evaluate.py", "--model", model, "--data-dir", os.path.relpath(DATA / "eval", REPO)]
    commands = [[*base, *[x for lang, f in files.items() for x in ("--ppl", f"{lang}={os.path.relpath(f, REPO)}")],
                 "--out", str(scored)]]
    if label in arm.benchmarks:
        tasks = ((KOBEST, KOBEST_LIMIT, "kobest"), ("mmlu", MMLU_LIMIT, "mmlu")) if arm.lang == "ko" else \
            (("jcommonsenseqa", JCQA_LIMIT, "jcqa"),)
        commands += [[*base, "--tasks", names, "--limit", str(limit), "--out", str(scored.with_suffix(f".{tag}.json"))]
                     for names, limit, tag in tasks]
    result: dict = {"nll": {}, "tasks": {}}
    for command in commands:
        target = Path(command[command.index("--out") + 1])
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            run_logged(command, log)
        r = json.loads(target.read_text())
        result["nll"] |= {lang: {k: v[k] for k in ("nll_per_token", "bits_per_byte", "tokens")}
                          for lang, v in r.get("perplexity", {}).items()}
        result["tasks"] |= r.get("tasks", {})
    return commands, result


def stage_numbers(run_dir: Path) -> dict:
    """Per stage: wall and training time, tokens, steps, throughput, validation losses, peak memory."""
    report = json.loads((run_dir / "report.json").read_text())
    stages = {}
    for name, s in report["stages"].items():
        records = [json.loads(x) for x in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
        peak = max((r.get("peak_memory_gb") or 0 for r in records), default=None)
        stages[name] = {k: s.get(k) for k in ("wall_s", "train_s", "steps", "tokens", "tokens_per_s", "val_loss")}
        stages[name]["peak_memory_gb"] = peak
        step0 = next((r for r in records if r.get("step") == 0 and "loss" not in r), {})
        stages[name]["step0"] = {k: v for k, v in step0.items() if "val_loss" in k}  # align: base and spliced
        stages[name]["command"] = s["command"]
        fidelity = [{k: v for k, v in r.items() if k == "step" or k.startswith("fidelity/")} for r in records
                    if any(k.startswith("fidelity/") for k in r)]
        if fidelity:  # --fidelity-every: the gradient cosines along training
            stages[name]["fidelity"] = fidelity
    return stages


def arm_cost(arm: Arm) -> dict:
    """Training FLOPs of each stage the arm's models paid for (tokens x analytic FLOPs per token, as elo's planner
    counts them: elo.pipeline.resources, the stand-in for the middle included), plus the stand-in's fit: the linear
    map's forward passes through the full model, or the distillation's steps. The control's ELO stage is only the
    source of its alignment tokens, so it is not counted."""
    recipe = recipe_of(arm)
    stages = {s.name: {"tokens": s.tokens, "flops_per_token": s.flops_per_token}
              for s in resources.plan(HERE / "recipes" / arm.recipe).stages}
    if recipe.get("align", {}).get("control"):
        del stages["train"]
    train = recipe["train"]
    if train.get("middle") and "train" in stages:  # the control's copied ELO run fitted nothing
        config = resources.load_model_config(recipe["model"])
        full = resources.stage_model("fft", TrainConfig(out="", data={}, layers=LayerChoice.parse("all")),
                                     config).requires_grad_(False)
        forward = train_flops_per_token(full, train["seq_len"])  # the full model's forward pass (the teacher's)
        if train["middle"] == "linear":  # forward passes over the fitted tokens
            stages["middle fit"] = {"tokens": train.get("middle_tokens", 12000), "flops_per_token": forward}
        else:  # distilled:K: each step, the teacher's forward and the student's (K blocks training) forward+backward
            k = MiddleChoice.parse(train["middle"]).blocks
            layers = [1, *range(2, 2 + k), config.num_hidden_layers]
            student = resources.stage_model("train", TrainConfig(out="", data={}, layers=LayerChoice.parse(
                ",".join(map(str, layers)))), config)
            middle = tuple(f"model.layers.{i}." for i in range(1, 1 + k))
            for name, p in student.named_parameters():
                p.requires_grad_(name.startswith(middle))
            stages["middle fit"] = {"tokens": train.get("middle_steps", 200) * train["batch_size"]
                                    * train.get("grad_accum", 1) * train["seq_len"],
                                    "flops_per_token": forward + train_flops_per_token(student, train["seq_len"])}
    return {"stages": stages, "flops": sum(v["tokens"] * v["flops_per_token"] for v in stages.values())}


def run_arm(arm: Arm, out: Path) -> None:
    result_path = HERE / "results" / f"{arm.name}.json"
    if result_path.is_file():
        print(f"== {arm.name}: done earlier ({os.path.relpath(result_path, REPO)}); skipped", flush=True)
        return
    print(f"\n== arm {arm.name}", flush=True)
    arm_out = out / arm.name  # the pipeline's run directory
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{arm.name}.log"
    result: dict = {"arm": arm.name, "recipe": None, "lang": arm.lang}
    if arm.recipe is not None:
        recipe = recipe_of(arm)
        result["lr"] = recipe["train"]["lr"]
        if arm.uses_choice and recipe["train"].get("layers") != "all" and result["lr"] != chosen_lr():
            raise SystemExit(f"{arm.recipe}: train.lr {result['lr']} is not the sweep's choice {chosen_lr()}; "
                             f"set it in the recipe")
        seed_elo_run(arm, out)
        command = [sys.executable, "pipeline.py", os.path.relpath(HERE / "recipes" / arm.recipe, REPO),
                   "--out", str(arm_out)]
        run_logged(command, log)
        result |= {"recipe": f"recipes/{arm.recipe}", "pipeline": shlex.join(command[1:]),
                   "stages": stage_numbers(arm_out), "cost": arm_cost(arm)}
        elo_run = json.loads((arm_out / "train" / "model" / "elo_run.json").read_text())
        result["elo_layers"] = elo_run.get("layers")
        if "layer_scores" in elo_run:  # --layers auto:K: what it chose from
            result["layer_scores"] = elo_run["layer_scores"]
    result["models"], result["evaluate"] = {}, []
    for label, where in arm.models.items():
        model = where if arm.recipe is None else os.path.relpath(arm_out / where, REPO)
        commands, result["models"][label] = evaluate(model, label, arm, out, log)
        result["evaluate"] += [shlex.join(c[1:]) for c in commands]
    atomic_write_text(result_path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"== {arm.name}: done -> {os.path.relpath(result_path, REPO)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="*", help=f"arms to run (default: all, in order): {', '.join(a.name for a in ARMS)}")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "smollm2-ko")
    parser.add_argument("--refresh-cost", action="store_true", help="recompute the training FLOPs ('cost') of every "
                                                                    "finished arm from its recipe; run nothing")
    args = parser.parse_args()
    names = {a.name: a for a in ARMS}
    unknown = [n for n in args.arms if n not in names]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; expected among {', '.join(names)}")
    (HERE / "results").mkdir(exist_ok=True)
    if args.refresh_cost:
        for arm in ARMS:
            path = HERE / "results" / f"{arm.name}.json"
            if arm.recipe is not None and path.is_file():
                result = json.loads(path.read_text())
                atomic_write_text(path, json.dumps(result | {"cost": arm_cost(arm)}, indent=1, ensure_ascii=False)
                                  + "\n")
        return
    for arm in [names[n] for n in args.arms] if args.arms else ARMS:
        run_arm(arm, args.out.resolve())


if __name__ == "__main__":
    main()

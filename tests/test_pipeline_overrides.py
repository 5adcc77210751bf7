"""`pipeline.py RECIPE KEY=VALUE ...`: values set on top of a recipe, typed and checked like the file's own keys."""
import pytest

from elo.pipeline.recipe import parse_override, plan

QUICKSTART = "recipes/quickstart.toml"


@pytest.mark.parametrize("text, expected", [
    ("train.lr=1e-3", (["train", "lr"], 1e-3)),
    ("train.layers=1,30", (["train", "layers"], "1,30")),
    ("nproc=2", (["nproc"], 2)),
    ("align.save_spliced=false", (["align", "save_spliced"], False)),
    ("evaluate.tasks=[\"kobest_copa\", \"mmlu\"]", (["evaluate", "tasks"], ["kobest_copa", "mmlu"])),
    ("model=HuggingFaceTB/SmolLM2-135M", (["model"], "HuggingFaceTB/SmolLM2-135M")),
])
def test_values_are_read_as_toml_else_as_strings(text, expected):
    assert parse_override(text) == expected


def test_an_override_changes_the_stage_command(tmp_path):
    base = plan(QUICKSTART, tmp_path)
    p = plan(QUICKSTART, tmp_path, ["train.lr=1e-3", "train.layers=1,2"])
    argv = p.stages["train"].argv
    assert argv[argv.index("--lr") + 1] == "0.001" and argv[argv.index("--layers") + 1] == "1,2"
    assert base.stages["train"].argv != argv and p.overrides == ["train.lr=1e-3", "train.layers=1,2"]


@pytest.mark.parametrize("override, message", [
    ("train.lr", "override 'train.lr': expected KEY=VALUE"),
    ("train.nope=1", "recipe key train.nope: unknown"),
    ("train.lr=fast", "recipe key train.lr: 'fast' is not a number"),
    ("nproc=two", "recipe key nproc: 'two' is not an integer"),
    ("model.lr=1", "recipe key model: is not a table"),
    ("colour=1", "recipe key colour: unknown"),
])
def test_bad_overrides_are_one_line_errors_like_bad_recipe_keys(tmp_path, override, message):
    with pytest.raises(ValueError) as e:
        plan(QUICKSTART, tmp_path, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)

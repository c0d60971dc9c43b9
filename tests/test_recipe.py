"""CompressRecipe / FinetuneOptions: validation, files, flags generated from the fields."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from rankcut.cli import build_parser
from rankcut.cli.compress import recipe_from_args
from rankcut.errors import ConfigError, RankcutError
from rankcut.recipe import CompressRecipe, FinetuneOptions

#: Every compress option, as ``rankcut compress`` had them before recipes were
#: dataclasses (same names, same defaults), plus the streaming options.
DEFAULTS = {
    "model": "smollm2-135m",
    "method": "svd-llm",
    "ratio": 0.2,
    "calib": "auto",
    "samples": 32,
    "seq_len": None,  # not chosen: 512, or the model's positions if fewer
    "out": None,
    "device": None,
    "seed": 0,
    "targets": None,
    "exclude": [],
    "option": {},
    "allocation": None,  # not chosen: global (uniform when streaming)
    "pipeline": "auto",
    "refit": True,
    "min_rank_fraction": 0.25,
    "compute_dtype": "auto",
    "recover": 0,
    "recover_lr": 1e-4,
    "recover_lora": 0,
    "recover_data": "auto",
    "recover_windows": None,
    "recover_seq_len": None,  # not chosen: 256, or the model's positions if fewer
    "distill": 1.0,
    "eval_data": None,
    "offload_dir": None,
    "offload_mb": 1024,
    "in_memory": False,
}


def test_fields_and_defaults():
    assert CompressRecipe().to_dict() == DEFAULTS
    assert list(CompressRecipe().to_dict()) == list(DEFAULTS)  # recipe.json key order


def test_every_field_has_help():
    for cls in (CompressRecipe, FinetuneOptions):
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f.name


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"samples": "4"}, "recipe: 'samples' must be an integer, got '4'"),
        ({"samples": 4.0}, "recipe: 'samples' must be an integer, got 4.0"),
        ({"samples": True}, "recipe: 'samples' must be an integer, got True"),
        ({"ratio": "lots"}, "recipe: 'ratio' must be a number, got 'lots'"),
        ({"refit": 1}, "recipe: 'refit' must be true or false, got 1"),
        ({"targets": "q_proj"}, "recipe: 'targets' must be a list of strings or null"),
        ({"exclude": None}, "recipe: 'exclude' must be a list of strings, got None"),
        ({"exclude": ["a", 1]}, "recipe: 'exclude' must be a list of strings"),
        ({"option": [1]}, "recipe: 'option' must be an object of KEY: VALUE, got [1]"),
        ({"model": None}, "recipe: 'model' must be a string, got None"),
        ({"device": "tpu"}, "recipe: 'device' must be one of cpu, cuda, got 'tpu'"),
        ({"pipeline": "fast"}, "recipe: 'pipeline' must be one of auto"),
        ({"method": "nosuch"}, "recipe: 'method' must be one of"),
        ({"allocation": "nosuch"}, "recipe: 'allocation' must be one of"),
        ({"recover": -1}, "recipe: 'recover' must be >= 0, got -1"),
    ],
)
def test_bad_values_fail_with_one_line(values, message):
    with pytest.raises(ConfigError) as info:
        CompressRecipe.from_dict(values)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_numbers_and_tuples():
    recipe = CompressRecipe(ratio=1 / 4, min_rank_fraction=0, targets=("q_proj",))
    assert recipe.targets == ["q_proj"]  # a list, as its JSON reads back
    assert CompressRecipe.from_dict(json.loads(recipe.to_json())) == recipe


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown recipe keys: colour, size; valid: model"):
        CompressRecipe.from_dict({"ratio": 0.3, "colour": "red", "size": 2})
    with pytest.raises(ConfigError, match="unknown finetune keys: recover"):
        FinetuneOptions.from_dict({"recover": 3})


def test_dashes_in_keys():
    recipe = CompressRecipe.from_dict({"seq-len": 64, "min-rank-fraction": 0.5})
    assert (recipe.seq_len, recipe.min_rank_fraction) == (64, 0.5)
    assert CompressRecipe(option={"allocation-options": {}}).option == {"allocation_options": {}}


def _custom() -> CompressRecipe:
    return CompressRecipe(
        model="tiny",
        method="svd",
        ratio=0.3,
        targets=["q_proj", "k_proj"],
        option={"rank_multiple": 1},
        allocation="uniform",
        refit=False,
        recover_windows=7,
        in_memory=True,
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip(suffix, tmp_path):
    if suffix != ".json":
        pytest.importorskip("yaml")
    path = _custom().to_file(tmp_path / f"recipe{suffix}")
    assert CompressRecipe.from_file(path) == _custom()


def test_yaml_and_json_hold_the_same_recipe(tmp_path):
    yaml = pytest.importorskip("yaml")
    _custom().to_file(tmp_path / "r.yaml")
    _custom().to_file(tmp_path / "r.json")
    data = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert data == json.loads((tmp_path / "r.json").read_text()) == _custom().to_dict()


def test_yaml_without_pyyaml(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text("ratio: 0.3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    with pytest.raises(RankcutError, match="PyYAML"):
        CompressRecipe.from_file(path)
    with pytest.raises(RankcutError, match="PyYAML"):
        CompressRecipe().to_file(path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{oops", "cannot parse recipe"),
        ("[1, 2]", "must hold an object"),
        ('{"samples": "4"}', "recipe: 'samples' must be an integer, got '4' (in "),
        ('{"colour": "red"}', "unknown recipe keys: colour"),
    ],
)
def test_bad_files(content, fragment, tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(content)
    with pytest.raises(RankcutError) as info:
        CompressRecipe.from_file(path)
    assert fragment in str(info.value)
    with pytest.raises(RankcutError, match="path does not exist"):
        CompressRecipe.from_file(tmp_path / "missing.json")


def test_merged_overrides_and_merges_options():
    base = CompressRecipe(ratio=0.5, option={"eps": 1e-5, "rank_multiple": 4})
    merged = base.merged({"ratio": 0.3, "option": {"rank-multiple": 1}})
    assert merged.ratio == 0.3
    assert merged.option == {"eps": 1e-5, "rank_multiple": 1}
    assert base.ratio == 0.5  # unchanged
    with pytest.raises(ConfigError, match="'samples'"):
        base.merged({"samples": "many"})


def test_allocation_default_is_recorded():
    assert not CompressRecipe().allocation_given
    assert CompressRecipe().method_config().allocation == "global"
    explicit = CompressRecipe(allocation="global")
    assert explicit.allocation_given and explicit.method_config().allocation == "global"
    assert json.loads(CompressRecipe().to_json())["allocation"] is None


def test_method_config():
    config = _custom().method_config()
    assert type(config).__name__ == "SvdConfig"
    assert (config.ratio, config.targets, config.allocation, config.refit) == (
        0.3,
        ["q_proj", "k_proj"],
        "uniform",
        False,
    )
    assert config.rank_multiple == 1
    with pytest.raises(ConfigError, match="unknown option.s. for svd: nosuchkey; valid: .*rank"):
        CompressRecipe(method="svd", option={"nosuchkey": 1}).method_config()
    with pytest.raises(ConfigError, match="unknown option.s. for svd: ratio"):
        CompressRecipe(method="svd", option={"ratio": 0.5}).method_config()  # a field


def test_output_dir():
    assert str(CompressRecipe(method="svd", ratio=0.3).output_dir()) == "runs/smollm2-135m-svd-0.3"
    assert str(CompressRecipe(model="a/b/tiny", out="x").output_dir()) == "x"


# --------------------------------------------------------------------------- flags


def _compress_args(*argv):
    return build_parser().parse_args(["compress", *map(str, argv)])


def test_every_field_is_a_flag():
    args = _compress_args()
    for name in DEFAULTS:
        assert getattr(args, name) is None, name  # not given: the recipe's value stays
    assert recipe_from_args(args) == CompressRecipe()


def test_flags_fill_every_kind():
    args = _compress_args(
        "--model", "tiny", "--ratio", "0.3", "--samples", "8", "--targets", "q", "k",
        "--option", "eps=1e-5", "--option", "no-such=x", "--no-refit", "--in-memory",
        "--allocation", "energy", "--offload-mb", "0",
    )  # fmt: skip
    recipe = recipe_from_args(args)
    assert (recipe.model, recipe.ratio, recipe.samples) == ("tiny", 0.3, 8)
    assert recipe.targets == ["q", "k"]
    assert recipe.option == {"eps": 1e-5, "no_such": "x"}
    assert recipe.refit is False and recipe.in_memory is True
    assert recipe.allocation == "energy" and recipe.offload_mb == 0.0


def test_flags_override_recipe_values(tmp_path):
    path = CompressRecipe(ratio=0.5, samples=4, option={"eps": 1e-5}, refit=False).to_file(
        tmp_path / "recipe.json"
    )
    args = _compress_args("--recipe", path, "--ratio", "0.3", "--option", "rank_multiple=2")
    recipe = recipe_from_args(args)
    assert recipe.ratio == 0.3  # the flag wins
    assert recipe.samples == 4 and recipe.refit is False  # the file fills the rest
    assert recipe.option == {"eps": 1e-5, "rank_multiple": 2}
    assert not recipe.allocation_given


@pytest.mark.parametrize("flag", ["--method", "--allocation", "--pipeline", "--device"])
def test_closed_sets_are_choices(flag, capsys):
    with pytest.raises(SystemExit):
        _compress_args(flag, "nosuch")
    assert "invalid choice" in capsys.readouterr().err


def test_finetune_flags():
    args = build_parser().parse_args(["finetune", "dir", "--steps", "4", "--seq-len", "32"])
    from rankcut.cli.common import given_options

    options = FinetuneOptions.from_dict(given_options(args, FinetuneOptions))
    assert (options.steps, options.eval_seq_len, options.train_seq_len) == (4, 32, 256)


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "--debug", "methods"],
        ["methods", "-q", "--debug"],
        ["-q", "methods", "--debug"],
        ["--debug", "eval", "x", "--quiet"],
    ],
)
def test_global_flags_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.debug is True


def test_global_flags_default_off():
    args = build_parser().parse_args(["methods"])
    assert args.quiet is False and args.debug is False

"""The command line, called in-process through ``rankcut.cli.main`` (tiny models, no network)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from rankcut.cli import main
from rankcut.errors import RankcutError

METHODS = ["asvd", "fwsvd", "svd", "svd-llm"]
CALIB = ["--samples", "4", "--seq-len", "32"]
EVAL = ["--tokens", "256", "--seq-len", "32"]
RATIO = 0.3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test touches ~/.cache or the repository: cache and cwd go to a tmp folder."""
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def compress_args(model, out, method="svd", calib=None, extra=()) -> list:
    args = ["compress", "--model", model, "--method", method, "--ratio", RATIO, "--out", out]
    if "--allocation" not in extra:
        args += ["--allocation", "uniform"]  # these tests check the uniform rank formula
    if calib is not None:
        args += ["--calib", calib, *CALIB]
    return [*args, *extra]


def eval_json(capsys, model, data) -> dict:
    capsys.readouterr()
    assert run("eval", model, "--data", data, *EVAL, "--json") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def assert_user_error(capsys, code: int, *fragments: str) -> str:
    """Exit code 2 and one line ``rankcut: error: ...`` on stderr; returns that line."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # transformers' "Loading weights" bar may precede the message even under -q (see
    # test_quiet_means_no_progress_bars); the message itself must be the last, only line.
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    assert [line for line in lines if "rankcut:" in line] == [lines[-1]], err
    assert lines[-1].startswith("rankcut: error:"), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def uniform_rank(m: int, n: int, ratio: float) -> int:
    return math.floor((1 - ratio) * m * n / (m + n))


def compress_shared(tmp_path_factory, model, name: str) -> Path:
    """``model`` svd-compressed (uniform, no calibration) into a fresh folder for a module."""
    out = tmp_path_factory.mktemp(name) / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANKCUT_CACHE", str(out.parent / "cache"))
        assert run(*compress_args(model, out)) == 0
    return out


@pytest.fixture(scope="module")
def svd_out(tmp_path_factory, tiny_llama_dir):
    """One svd-compressed output folder, shared (copy it before editing)."""
    return compress_shared(tmp_path_factory, tiny_llama_dir, "svd-shared")


@pytest.fixture
def svd_copy(svd_out, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(svd_out, copy)
    return copy


# --------------------------------------------------------------------------- methods


def test_methods_lists_each_method_on_one_line(capsys):
    assert run("methods") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    from rankcut.methods import METHODS as REGISTERED

    assert len(lines) == len(REGISTERED)
    assert sorted(line.split()[0] for line in lines) == sorted(REGISTERED)
    for line in lines:
        assert len(line.split()) > 1, f"no summary: {line!r}"


# --------------------------------------------------------------------------- compress + eval


@pytest.mark.parametrize("method", METHODS)
def test_compress_then_eval(method, capsys, tmp_path, tiny_llama_dir, calib_file, eval_file):
    out = tmp_path / f"out-{method}"
    assert run(*compress_args(tiny_llama_dir, out, method, calib_file)) == 0
    stdout = capsys.readouterr().out
    assert f"saved to {out}" in stdout

    names = {p.name for p in out.iterdir()}
    for required in ("rankcut.json", "model.safetensors", "config.json", "recipe.json"):
        assert required in names
    assert set(TOKENIZER_FILES) <= names, names
    assert not list(tmp_path.glob(f".{out.name}.tmp-*"))

    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["format"] == "rankcut"
    assert meta["method_config"]["method"] == method
    assert meta["method_config"]["ratio"] == RATIO
    layers = meta["layers"]
    # 2 decoder layers x (q, k, v, o, gate, up, down), all factorized at ratio 0.3.
    assert len(layers) == 14
    for name in (
        "model.layers.0.self_attn.q_proj",  # 64 x 64
        "model.layers.0.self_attn.k_proj",  # 32 x 64 (grouped-query attention)
        "model.layers.1.mlp.down_proj",  # 64 x 128
    ):
        spec = layers[name]
        m, n = spec["out_features"], spec["in_features"]
        assert spec["rank"] == uniform_rank(m, n, RATIO)
        assert meta["ranks"][name] == spec["rank"]
    assert layers["model.layers.0.self_attn.q_proj"]["rank"] == 22
    assert layers["model.layers.0.self_attn.k_proj"]["rank"] == 14
    assert layers["model.layers.1.mlp.down_proj"]["rank"] == 29
    if method == "svd":
        assert meta["calibration"] is None
    else:
        assert meta["calibration"]["samples"] == 4 and meta["calibration"]["seq_len"] == 32

    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == method and recipe["ratio"] == RATIO
    assert recipe["out"] == str(out)

    report = eval_json(capsys, out, eval_file)
    for key in ("perplexity", "tokens", "seq_len", "params_total", "params_dense_equivalent"):
        assert key in report
    assert report["model"] == str(out)
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
    assert report["seq_len"] == 32
    assert 0 < report["tokens"] <= 256
    assert report["method"] == method
    assert report["params_total"] < report["params_dense_equivalent"]


def test_eval_uncompressed(capsys, tiny_llama_dir, eval_file):
    report = eval_json(capsys, tiny_llama_dir, eval_file)
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
    assert report["tokens"] > 0 and report["seq_len"] == 32
    assert report["params_total"] == report["params_dense_equivalent"]
    assert report["model"] == str(tiny_llama_dir)


def test_eval_dense_equivalent_matches_the_base_model(capsys, svd_out, tiny_llama_dir, eval_file):
    base = eval_json(capsys, tiny_llama_dir, eval_file)
    compressed = eval_json(capsys, svd_out, eval_file)
    assert compressed["params_dense_equivalent"] == base["params_total"]
    assert compressed["tokens"] == base["tokens"]


def test_eval_text_output(capsys, svd_out, eval_file):
    assert run("eval", svd_out, "--data", eval_file, *EVAL) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "perplexity" in out[0]


def test_quiet_eval_of_rankcut_output_is_silent(capsys, svd_out, eval_file):
    capsys.readouterr()
    assert run("eval", svd_out, "--data", eval_file, *EVAL, "--json") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["compress", "eval", "error"])
def test_quiet_means_no_progress_bars(command, capsys, tmp_path, tiny_llama_dir, eval_file):
    capsys.readouterr()
    if command == "compress":
        assert run(*compress_args(tiny_llama_dir, tmp_path / "out")) == 0
        assert capsys.readouterr().err == ""
    elif command == "eval":
        assert run("eval", tiny_llama_dir, "--data", eval_file, *EVAL, "--json") == 0
        assert capsys.readouterr().err == ""
    else:
        extra = ["--targets", "nomatch"]
        assert run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=extra)) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("ratio", ["0", "1.5", "1", "-0.2", "nan"])
def test_bad_ratio(ratio, capsys, tmp_path, tiny_llama_dir):
    args = compress_args(tiny_llama_dir, tmp_path / "out")
    args[args.index("--ratio") + 1] = ratio
    assert_user_error(capsys, run(*args), "ratio")
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_an_argparse_error(capsys, tmp_path, tiny_llama_dir):
    with pytest.raises(SystemExit) as info:
        run(*compress_args(tiny_llama_dir, tmp_path / "out", method="nosuchmethod"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


def test_unknown_model_alias(capsys, tmp_path):
    line = assert_user_error(capsys, run(*compress_args("nosuchmodel", tmp_path / "out")))
    assert "unknown model 'nosuchmodel'" in line
    assert "smollm2-135m" in line  # lists the aliases
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_missing_model_path(command, capsys, tmp_path, eval_file):
    if command == "compress":
        code = run(*compress_args("./missing/dir", tmp_path / "out"))
    else:
        code = run("eval", "./missing/dir", "--data", eval_file, *EVAL)
    assert_user_error(capsys, code, "path does not exist", "./missing/dir")


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code = run(*compress_args(tmp_path / "empty", tmp_path / "out"))
    assert_user_error(capsys, code, "config.json")


@pytest.mark.parametrize("method", ["svd-llm", "asvd"])
def test_missing_calibration_file(method, capsys, tmp_path, tiny_llama_dir):
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", method, "./missing.txt"))
    assert_user_error(capsys, code, "path does not exist", "./missing.txt")


def test_missing_eval_file(capsys, svd_out):
    code = run("eval", svd_out, "--data", "./missing.txt", *EVAL)
    assert_user_error(capsys, code, "path does not exist", "./missing.txt")


def test_unknown_corpus_name(capsys, tmp_path, tiny_llama_dir):
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", "svd-llm", "nosuchcorpus"))
    assert_user_error(capsys, code, "unknown corpus 'nosuchcorpus'", "shakespeare")


def test_no_target_module(capsys, tmp_path, tiny_llama_dir):
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=["--targets", "nomatch"]))
    line = assert_user_error(capsys, code, "no target module found", "nomatch")
    assert "q_proj" in line and "down_proj" in line  # lists what exists
    assert not (tmp_path / "out").exists()


def test_everything_excluded(capsys, tmp_path, tiny_llama_dir):
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=["--exclude", "proj"]))
    assert_user_error(capsys, code, "no target module found", "q_proj")


def test_calibration_text_too_short(capsys, tmp_path, tiny_llama_dir):
    short = tmp_path / "short.txt"
    short.write_text("the king and the queen speak of the night.\n")
    args = compress_args(tiny_llama_dir, tmp_path / "out", "svd-llm", short)
    args[args.index("--samples") + 1] = "1000"
    line = assert_user_error(capsys, run(*args), "calibration text is too short")
    assert "1000 x 32 = 32000" in line
    assert not (tmp_path / "out").exists()


def test_eval_text_too_short(capsys, tmp_path, svd_out):
    short = tmp_path / "short.txt"
    short.write_text("the king.\n")
    code = run("eval", svd_out, "--data", short, *EVAL)
    assert_user_error(capsys, code, "too short")


@pytest.fixture(scope="module")
def nan_llama_dir(tmp_path_factory, tiny_llama_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tmp_path_factory.mktemp("nan-llama")
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3, 5] = float("nan")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_non_finite_weights(method, capsys, tmp_path, nan_llama_dir, calib_file):
    code = run(*compress_args(nan_llama_dir, tmp_path / "out", method, calib_file))
    assert_user_error(capsys, code, "non-finite", "model.layers.1.self_attn.q_proj")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_overwrite(capsys, tmp_path, tiny_llama_dir, eval_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    code = run(*compress_args(tiny_llama_dir, out))
    assert_user_error(capsys, code, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert run(*compress_args(tiny_llama_dir, out, extra=["--overwrite"])) == 0
    assert (out / "rankcut.json").is_file() and (out / "recipe.json").is_file()
    assert not (out / "notes.txt").exists()  # the folder was replaced, not merged
    assert not list(tmp_path.glob(".out.*"))  # no .tmp-/.old- leftovers
    assert eval_json(capsys, out, eval_file)["params_total"] > 0

    # A second run over a finished output also needs --overwrite.
    code = run(*compress_args(tiny_llama_dir, out))
    assert_user_error(capsys, code, "not empty")


def test_empty_out_folder_is_fine(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    assert run(*compress_args(tiny_llama_dir, out)) == 0
    assert (out / "rankcut.json").is_file()


def test_out_is_a_file(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.write_text("x")
    code = run(*compress_args(tiny_llama_dir, out, extra=["--overwrite"]))
    assert_user_error(capsys, code, "not a folder")
    assert out.read_text() == "x"


@pytest.mark.parametrize(
    "garbage", ["{not json", "", "[]", '{"format": "something-else"}', "\udcff"]
)
def test_corrupted_rankcut_json(garbage, capsys, svd_copy, eval_file):
    (svd_copy / "rankcut.json").write_text(garbage, errors="surrogateescape")
    code = run("eval", svd_copy, "--data", eval_file, *EVAL)
    assert_user_error(capsys, code, "rankcut.json")


def _edit_meta(folder: Path, edit) -> None:
    path = folder / "rankcut.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m["layers"][Q0].update(rank=5), "do not match"),
        (lambda m: m["layers"][Q0].update(rank=60), "do not match"),
        (lambda m: m["layers"][Q0].update(rank=-3), "invalid layer entry"),
        (lambda m: m["layers"][Q0].update(rank=0), "invalid layer entry"),
        (lambda m: m["layers"][Q0].update(rank="22"), "invalid layer entry"),
        (lambda m: m["layers"][Q0].update(rank=22.5), "invalid layer entry"),
        (lambda m: m["layers"][Q0].update(type="Nope"), "invalid layer entry"),
        (lambda m: m["layers"][Q0].update(in_features=65), "do not match"),
        (lambda m: m["layers"].pop(Q0), "unexpected tensors"),
        (lambda m: m.update(layers=[]), "'layers'"),
        (lambda m: m["layers"].update({"model.layers.9.mlp.up_proj": m["layers"][Q0]}), "absent"),
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m.update(architecture="NoSuchForCausalLM"), "NoSuchForCausalLM"),
    ],
    ids=[
        "rank-smaller",
        "rank-larger",
        "rank-negative",
        "rank-zero",
        "rank-string",
        "rank-float",
        "unknown-type",
        "in-features",
        "layer-dropped",
        "layers-not-object",
        "extra-layer",
        "future-version",
        "architecture",
    ],
)
def test_hand_edited_rankcut_json(edit, fragment, capsys, svd_copy, eval_file):
    _edit_meta(svd_copy, edit)
    code = run("eval", svd_copy, "--data", eval_file, *EVAL)
    assert_user_error(capsys, code, fragment)


def _drop_tokenizer(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()


def test_eval_of_output_saved_without_tokenizer(capsys, svd_copy, eval_file):
    _drop_tokenizer(svd_copy)
    code = run("eval", svd_copy, "--data", eval_file, *EVAL)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "rankcut: error: cannot load a tokenizer" in err
    assert "saved without a tokenizer" in err


def test_eval_of_output_saved_without_tokenizer_one_line(capsys, svd_copy, eval_file):
    _drop_tokenizer(svd_copy)
    code = run("eval", svd_copy, "--data", eval_file, *EVAL)
    assert_user_error(capsys, code, "saved without a tokenizer")


def test_missing_weights_file(capsys, svd_copy, eval_file):
    (svd_copy / "model.safetensors").unlink()
    code = run("eval", svd_copy, "--data", eval_file, *EVAL)
    assert_user_error(capsys, code, "model.safetensors")


def test_truncated_weights_file(capsys, svd_copy, eval_file):
    path = svd_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    code = run("eval", svd_copy, "--data", eval_file, *EVAL)
    assert_user_error(capsys, code, "model.safetensors")


@pytest.mark.parametrize(
    ("option", "key"), [("nosuchkey=1", "nosuchkey"), ("no-such-key=true", "no_such_key")]
)
def test_unknown_option_key(option, key, capsys, tmp_path, tiny_llama_dir):
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=["--option", option]))
    line = assert_user_error(capsys, code, "unknown option(s) for svd", key)
    assert "allocation" in line  # lists the valid keys


def test_malformed_option_is_an_argparse_error(capsys, tmp_path, tiny_llama_dir):
    with pytest.raises(SystemExit) as info:
        run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=["--option", "novalue"]))
    assert info.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bad_option_value(capsys, tmp_path, tiny_llama_dir):
    extra = ["--option", "allocation_options=[1]"]
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=extra))
    assert_user_error(capsys, code, "allocation_options")


def test_invalid_target_regex(capsys, tmp_path, tiny_llama_dir):
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=["--targets", "q_proj("]))
    assert_user_error(capsys, code, "invalid regex")


def test_cuda_requested_without_cuda(capsys, tmp_path, tiny_llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    code = run(*compress_args(tiny_llama_dir, tmp_path / "out", extra=["--device", "cuda"]))
    assert_user_error(capsys, code, "--device cuda")


def test_compress_a_compressed_output(capsys, tmp_path, svd_out):
    out = tmp_path / "again"
    code = run(*compress_args(svd_out, out))
    if code != 0:
        assert_user_error(capsys, code)  # refusing clearly would be fine too
    else:
        assert (out / "rankcut.json").is_file()


def test_tied_lm_head_accounting(capsys, tmp_path, tiny_llama_dir, eval_file):
    base = eval_json(capsys, tiny_llama_dir, eval_file)
    out = tmp_path / "out"
    extra = ["--targets", "lm_head", "mlp"]
    assert run(*compress_args(tiny_llama_dir, out, extra=extra)) == 0
    report = eval_json(capsys, out, eval_file)
    # A tied head stays dense: factorizing it would untie it and grow the model.
    assert report["params_dense_equivalent"] == base["params_total"]
    assert report["params_total"] < base["params_total"]
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["kept_dense"] == ["lm_head"]
    assert meta["layers"] and all("mlp" in name for name in meta["layers"])


def test_out_is_the_current_folder(capsys, tiny_llama_dir):
    code = run(*compress_args(tiny_llama_dir, "."))
    if code != 0:
        assert_user_error(capsys, code)
    else:
        assert Path("rankcut.json").is_file()


# --------------------------------------------------------------------------- --debug


def test_debug_reraises(tmp_path, tiny_llama_dir):
    args = compress_args(tiny_llama_dir, tmp_path / "out")
    args[args.index("--ratio") + 1] = "0"
    with pytest.raises(RankcutError, match="ratio"):
        main(["-q", "--debug", *map(str, args)])


def test_debug_reraises_bad_model(tmp_path):
    with pytest.raises(RankcutError, match="nosuchmodel"):
        main(["-q", "--debug", *map(str, compress_args("nosuchmodel", tmp_path / "out"))])


# --------------------------------------------------------------------------- recipes


def test_recipe_with_flag_override(capsys, tmp_path, tiny_llama_dir, calib_file):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "model": str(tiny_llama_dir),
                "method": "svd-llm",
                "ratio": 0.5,
                "calib": str(calib_file),
                "samples": 4,
                "seq-len": 32,  # dashes are accepted like the flags
                "allocation": "uniform",
                "option": {"eps": 1e-5},
            }
        )
    )
    out = tmp_path / "out"
    assert run("compress", "--recipe", recipe, "--ratio", RATIO, "--out", out) == 0
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["ratio"] == RATIO  # the flag wins
    assert saved["method"] == "svd-llm"  # the recipe fills the rest
    assert saved["samples"] == 4 and saved["seq_len"] == 32
    assert saved["model"] == str(tiny_llama_dir)
    assert saved["option"] == {"eps": 1e-5}
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["method_config"]["method"] == "svd-llm"
    assert meta["method_config"]["ratio"] == RATIO
    assert meta["layers"][Q0]["rank"] == uniform_rank(64, 64, RATIO)


def test_recipe_without_override(tmp_path, tiny_llama_dir):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {"model": str(tiny_llama_dir), "method": "svd", "ratio": 0.5, "allocation": "uniform"}
        )
    )
    out = tmp_path / "out"
    assert run("compress", "--recipe", recipe, "--out", out) == 0
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["method_config"]["ratio"] == 0.5
    assert meta["layers"][Q0]["rank"] == uniform_rank(64, 64, 0.5)
    assert json.loads((out / "recipe.json").read_text())["ratio"] == 0.5


def test_saved_recipe_reproduces_the_run(tmp_path, tiny_llama_dir, calib_file):
    first = tmp_path / "first"
    assert run(*compress_args(tiny_llama_dir, first, "svd-llm", calib_file)) == 0
    second = tmp_path / "second"
    assert run("compress", "--recipe", first / "recipe.json", "--out", second) == 0
    a = json.loads((first / "rankcut.json").read_text())
    b = json.loads((second / "rankcut.json").read_text())
    assert a["layers"] == b["layers"] and a["method_config"] == b["method_config"]
    assert a["calibration"] == b["calibration"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{oops", "cannot parse recipe"),
        ("[1, 2]", "must hold an object"),
        ('{"ratio": 0.3, "colour": "red"}', "unknown recipe keys"),
    ],
)
def test_bad_recipe(content, fragment, capsys, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(content)
    code = run("compress", "--recipe", recipe, "--out", tmp_path / "out")
    assert_user_error(capsys, code, fragment)


def test_yaml_recipe(tmp_path, tiny_llama_dir):
    pytest.importorskip("yaml")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\nmethod: svd\nratio: 0.5\n")
    out = tmp_path / "out"
    assert run("compress", "--recipe", recipe, "--ratio", RATIO, "--out", out) == 0
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["method"] == "svd" and saved["ratio"] == RATIO


@pytest.mark.parametrize(
    "fields",
    [{"samples": "4"}, {"option": [1]}, {"targets": "q_proj"}],
    ids=["samples-string", "option-list", "targets-string"],
)
def test_recipe_with_wrongly_typed_values(fields, capsys, tmp_path, tiny_llama_dir, calib_file):
    recipe = tmp_path / "recipe.json"
    base = {"model": str(tiny_llama_dir), "method": "svd-llm", "ratio": RATIO}
    base.update(calib=str(calib_file), samples=4, seq_len=32)
    recipe.write_text(json.dumps({**base, **fields}))
    out = tmp_path / "out"
    code = run("compress", "--recipe", recipe, "--out", out)
    if code == 0:  # accepted: then it must mean what it says
        layers = json.loads((out / "rankcut.json").read_text())["layers"]
        assert all(name.endswith("q_proj") for name in layers), sorted(layers)
    else:
        assert_user_error(capsys, code)


def test_missing_recipe(capsys, tmp_path):
    code = run("compress", "--recipe", "./missing.json", "--out", tmp_path / "out")
    assert_user_error(capsys, code, "path does not exist")


def test_recipe_with_bad_ratio(capsys, tmp_path, tiny_llama_dir):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": str(tiny_llama_dir), "ratio": "lots"}))
    code = run("compress", "--recipe", recipe, "--out", tmp_path / "out")
    assert_user_error(capsys, code, "ratio")


# --------------------------------------------------------------------------- atomicity


def _failing_save_file(exc):
    """A ``safetensors.torch.save_file`` that writes part of the file, then fails."""

    def fake(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise exc

    return fake


def _assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists() or not (out / "rankcut.json").exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


def test_interrupted_save_leaves_nothing(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(KeyboardInterrupt()))
    out = tmp_path / "out"
    assert run(*compress_args(tiny_llama_dir, out)) == 130
    assert "interrupted" in capsys.readouterr().err
    _assert_nothing_left(tmp_path, out)
    assert not out.exists()


def test_failed_save_leaves_nothing(monkeypatch, tmp_path, tiny_llama_dir):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(RuntimeError("disk")))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk"):
        run(*compress_args(tiny_llama_dir, out))
    _assert_nothing_left(tmp_path, out)
    assert not out.exists()


def test_failed_overwrite_keeps_the_old_output(
    capsys, monkeypatch, tmp_path, svd_out, tiny_llama_dir, eval_file
):
    import safetensors.torch

    out = tmp_path / "out"
    shutil.copytree(svd_out, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as mp:
        mp.setattr(safetensors.torch, "save_file", _failing_save_file(KeyboardInterrupt()))
        code = run(*compress_args(tiny_llama_dir, out, extra=["--ratio", "0.5", "--overwrite"]))
    assert code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    assert eval_json(capsys, out, eval_file)["params_total"] > 0


def test_default_calibration_mixes_text_and_generated(tmp_path, tiny_llama_dir):
    """No --calib: half built-in text, half sampled from the model; resolved in the recipe."""
    out = tmp_path / "auto"
    args = ["compress", "--model", tiny_llama_dir, "--method", "svd-llm", "--ratio", RATIO]
    assert run(*args, "--out", out, *CALIB) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["calib"] == "shakespeare+generated"
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["calibration"]["data"] == "shakespeare+generated"


def test_generated_calibration_and_recovery(capsys, tmp_path, tiny_llama_dir, eval_file):
    out = tmp_path / "gen"
    args = compress_args(tiny_llama_dir, out, "svd-llm", "generated", ("--recover", "3"))
    assert run(*args) == 0
    assert "recovery: 3 steps" in capsys.readouterr().out
    assert eval_json(capsys, out, eval_file)["perplexity"] > 1

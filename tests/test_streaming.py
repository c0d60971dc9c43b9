"""Streaming (layer-by-layer from safetensors files) and resumable compression."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load_file

import rankcut
from rankcut import streaming
from rankcut.errors import RankcutError
from rankcut.layers import factorized_modules
from rankcut.methods import FwsvdConfig, SvdConfig, SvdLlmConfig
from rankcut.models import find_decoder_layers
from rankcut.streaming import CheckpointReader, InjectedFault, stream_compress

from .conftest import tiny_llama


def calib(n=6, seq=32, seed=1):
    return torch.randint(3, 400, (n, seq), generator=torch.Generator().manual_seed(seed))


def save_checkpoint(path, tied=True, shard="60KB", layers=3):
    """A tiny Llama (3 layers) saved by transformers as (sharded) safetensors."""
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.tie_word_embeddings = tied
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt"))
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def weights(folder):
    index = folder / "model.safetensors.index.json"
    state = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(folder / f)))
    return state


def in_memory(folder, config, x):
    model = rankcut.load(folder)
    result = rankcut.compress(model, config, x, progress=False)
    return model, result


@pytest.mark.parametrize(
    ("tied", "refit", "shard"),
    [(True, True, "60KB"), (False, False, "60KB"), (False, True, None)],
)
def test_streaming_equals_in_memory_sequential(tmp_path, tied, refit, shard):
    ckpt = save_checkpoint(tmp_path / "ckpt", tied=tied, shard=shard or "10GB")
    x = calib()
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform", refit=refit)
    ref, result = in_memory(ckpt, config, x)
    meta = stream_compress(ckpt, config, x, tmp_path / "out", progress=False)
    assert meta["ranks"] == result.ranks and len(meta["ranks"]) == 21
    assert meta["params"] == result.params
    got = rankcut.load(tmp_path / "out")
    ref_layers = dict(factorized_modules(ref))
    for name, layer in factorized_modules(got):
        torch.testing.assert_close(layer.up.weight, ref_layers[name].up.weight)
        torch.testing.assert_close(layer.down.weight, ref_layers[name].down.weight)
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=x).logits, ref(input_ids=x).logits)
    if tied:
        assert got.lm_head.weight is got.model.embed_tokens.weight


def test_spilled_activations_give_the_same_output(tmp_path, sharded):
    x = calib()
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    a = stream_compress(sharded, config, x, tmp_path / "a", progress=False)
    b = stream_compress(sharded, config, x, tmp_path / "b", activation_limit_mb=0, progress=False)
    assert not a["streaming"]["activations_spilled"] and b["streaming"]["activations_spilled"]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


class WatchingReader(CheckpointReader):
    """Records every load and checks, at each, what the skeleton holds in memory."""

    def __init__(self, folder, skeletons, block_shapes):
        super().__init__(folder)
        self.skeletons, self.block_shapes = skeletons, block_shapes
        self.calls: list[list[str]] = []
        self.live_at_load: list[tuple[list[str], int]] = []
        # Block-shaped tensors that other tests keep alive (module-level caches of tiny
        # models) are not this run's: held here, so that their ids stay theirs.
        gc.collect()
        self.before = {id(o): o for o in self._block_shaped()}

    def _block_shaped(self):
        return [
            o
            for o in gc.get_objects()
            if issubclass(type(o), torch.Tensor)
            and o.device.type != "meta"
            and o.dtype == torch.float32
            and tuple(o.shape) in self.block_shapes
        ]

    def load(self, names, dtype, device):
        names = list(names)
        model = self.skeletons[-1]
        real_blocks = [
            b
            for b, m in find_decoder_layers(model)
            if any(p.device.type != "meta" for p in m.parameters())
        ]
        gc.collect()
        # Dense block-shaped fp32 matrices this run made that are alive anywhere in the
        # process (block weights, their dense twin, leftovers of earlier blocks).
        stray = sum(1 for o in self._block_shaped() if id(o) not in self.before)
        self.live_at_load.append((real_blocks, stray))
        self.calls.append(names)
        return super().load(names, dtype, device)


def test_at_most_one_decoder_layer_is_materialized(tmp_path, sharded, monkeypatch):
    skeletons = []
    build = streaming.build_skeleton

    def spy(*args, **kwargs):
        skeletons.append(build(*args, **kwargs))
        return skeletons[-1]

    monkeypatch.setattr(streaming, "build_skeleton", spy)
    shapes = {(64, 64), (32, 64), (128, 64), (64, 128)}  # q/o, k/v, gate/up, down
    reader = WatchingReader(sharded, skeletons, shapes)
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    stream_compress(sharded, config, calib(), tmp_path / "out", reader=reader, progress=False)
    block_loads = [c for c in reader.calls if any(".layers." in n for n in c)]
    assert all(all(".layers." in n for n in c) for c in block_loads)
    assert len(block_loads) == 3  # each decoder layer read once ...
    for names in block_loads:
        assert len({n.split(".layers.")[1].split(".")[0] for n in names}) == 1  # ... alone
    # When anything is read, no decoder layer and no block-shaped copy is in memory.
    assert reader.live_at_load and all(blocks == [] for blocks, _ in reader.live_at_load)
    assert all(stray == 0 for _, stray in reader.live_at_load), reader.live_at_load
    # The final norm and the head were never loaded to run anything (copied at the end).
    out = rankcut.load(tmp_path / "out")
    assert out.lm_head.weight is out.model.embed_tokens.weight


def test_resume_after_injected_fault_gives_identical_output(tmp_path, sharded, monkeypatch):
    x = calib()
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    stream_compress(sharded, config, x, tmp_path / "ref", progress=False)
    monkeypatch.setenv(streaming.FAULT_ENV, "0")
    with pytest.raises(InjectedFault):
        stream_compress(sharded, config, x, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    state = json.loads((tmp_path / ".out.partial" / "work" / "state.json").read_text())
    assert state["done"] == 0
    monkeypatch.delenv(streaming.FAULT_ENV)
    reader = CheckpointReader(sharded)
    loaded = []
    original = reader.load

    def counting(names, dtype, device):
        loaded.extend(names)
        return original(names, dtype, device)

    reader.load = counting
    meta = stream_compress(sharded, config, x, tmp_path / "out", reader=reader, progress=False)
    assert not any(".layers.0." in n for n in loaded)  # layer 0 was not redone
    assert any(".layers.1." in n for n in loaded)
    assert len(meta["streaming"]["layer_seconds"]) == 3
    assert not (tmp_path / ".out.partial").exists()
    ref, got = weights(tmp_path / "ref"), weights(tmp_path / "out")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ref_meta = json.loads((tmp_path / "ref" / "rankcut.json").read_text())
    assert ref_meta["layers"] == meta["layers"] and ref_meta["params"] == meta["params"]


@pytest.mark.parametrize("change", ["ratio", "method", "data", "model"])
def test_changed_inputs_refuse_to_resume(tmp_path, change, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    x = calib()
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    monkeypatch.setenv(streaming.FAULT_ENV, "1")
    with pytest.raises(InjectedFault):
        stream_compress(ckpt, config, x, tmp_path / "out", progress=False)
    monkeypatch.delenv(streaming.FAULT_ENV)
    expected = {"ratio": "ratio: 0.4 -> 0.3", "method": "method", "data": "calibration"}
    if change == "ratio":
        config = SvdLlmConfig(ratio=0.3, pipeline="sequential", allocation="uniform")
    elif change == "method":
        config = SvdConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    elif change == "data":
        x = calib(seed=2)
    else:
        save_checkpoint(ckpt, layers=3, shard="30KB")  # different files
        expected["model"] = "model.files"
    with pytest.raises(RankcutError, match="cannot resume") as err:
        stream_compress(ckpt, config, x, tmp_path / "out", progress=False)
    assert expected[change] in str(err.value)


def test_data_hungry_allocation_and_gradient_methods_are_refused(tmp_path, sharded):
    x = calib()
    with pytest.raises(RankcutError, match="allocation 'global'"):
        stream_compress(sharded, SvdLlmConfig(pipeline="sequential"), x, tmp_path / "o")
    with pytest.raises(RankcutError, match="loss gradients"):
        config = FwsvdConfig(pipeline="sequential", allocation="uniform")
        stream_compress(sharded, config, x, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_streams_a_safetensors_folder_and_resumes(
    tmp_path, tiny_tokenizer, calib_file, capsys, monkeypatch
):
    from rankcut.cli import main

    ckpt = save_checkpoint(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(ckpt)
    monkeypatch.chdir(tmp_path)
    args = ["-q", "compress", "--model", str(ckpt), "--method", "svd-llm", "--ratio", "0.3"]
    args += ["--pipeline", "sequential", "--calib", str(calib_file), "--samples", "4"]
    args += ["--seq-len", "32", "--offload-mb", "0"]
    # An explicit data-hungry allocation is refused; the default one falls back to uniform.
    assert main([*args, "--allocation", "energy", "--out", "x"]) == 2
    assert "allocation 'energy'" in capsys.readouterr().err
    monkeypatch.setenv(streaming.FAULT_ENV, "1")
    assert main([*args, "--out", "out", "--offload-dir", "work"]) == 2
    assert "fault injected after layer 1" in capsys.readouterr().err
    assert json.loads((tmp_path / "work" / "rankcut-out" / "state.json").read_text())["done"] == 1
    monkeypatch.delenv(streaming.FAULT_ENV)
    assert main([*args, "--out", "out", "--offload-dir", "work"]) == 0
    assert not (tmp_path / "work" / "rankcut-out").exists()
    assert main([*args, "--out", "ref"]) == 0
    meta = json.loads((tmp_path / "out" / "rankcut.json").read_text())
    assert meta["method_config"]["allocation"] == "uniform"
    assert meta["streaming"]["activations_spilled"]
    ref, got = weights(tmp_path / "ref"), weights(tmp_path / "out")
    assert all(torch.equal(ref[k], got[k]) for k in ref) and ref.keys() == got.keys()
    model = rankcut.load(tmp_path / "out")
    assert len(factorized_modules(model)) == 21
    assert rankcut.load_tokenizer(tmp_path / "out") is not None


def test_streaming_equals_in_memory_where_rank_multiple_applies(tmp_path):
    """Ranks above 4 x rank_multiple are rounded by the plan: streamed and in-memory
    compression must round them alike (they once differed: 68 vs 64 for k/v)."""
    big = tiny_llama(300, hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    big.save_pretrained(tmp_path / "ckpt")
    x = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    config = SvdLlmConfig(ratio=0.2, pipeline="sequential", allocation="uniform")
    ref = rankcut.load(tmp_path / "ckpt")
    result = rankcut.compress(ref, config, x, progress=False)
    rankcut.save(ref, tmp_path / "mem", extra={"ranks": result.ranks})
    meta = stream_compress(tmp_path / "ckpt", config, x, tmp_path / "out", progress=False)

    assert meta["ranks"] == result.ranks
    assert min(result.ranks.values()) > 32 and all(r % 8 == 0 for r in result.ranks.values())
    mem_meta = json.loads((tmp_path / "mem" / "rankcut.json").read_text())
    only_streamed = {"streaming", "kept_dense", "compression_seconds"}
    assert {k: v for k, v in meta.items() if k not in only_streamed} == mem_meta
    assert meta["kept_dense"] == result.kept_dense
    got = rankcut.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=x).logits, ref(input_ids=x).logits)


def test_overwrite_discards_a_stale_partial(tmp_path, sharded, monkeypatch):
    x = calib()
    old = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    new = SvdLlmConfig(ratio=0.3, pipeline="sequential", allocation="uniform")
    monkeypatch.setenv(streaming.FAULT_ENV, "0")
    with pytest.raises(InjectedFault):
        stream_compress(sharded, old, x, tmp_path / "out", progress=False)
    monkeypatch.delenv(streaming.FAULT_ENV)
    with pytest.raises(RankcutError, match="use --overwrite"):
        stream_compress(sharded, new, x, tmp_path / "out", progress=False)
    meta = stream_compress(sharded, new, x, tmp_path / "out", progress=False, overwrite=True)
    assert meta["method_config"]["ratio"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    ref = stream_compress(sharded, new, x, tmp_path / "ref", progress=False)
    assert ref["layers"] == meta["layers"]
    a, b = weights(tmp_path / "out"), weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_and_saved_folders_have_the_same_mode(tmp_path, sharded):
    import os

    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    umask = os.umask(0o027)  # not the usual 022: the mode must follow it, not be fixed
    try:
        stream_compress(sharded, config, calib(), tmp_path / "streamed", progress=False)
        rankcut.save(tiny_llama(), tmp_path / "saved")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"streamed": 0o750, "saved": 0o750, "plain": 0o750}
    # The report is published with the streamed output.
    assert (tmp_path / "streamed" / "report.md").is_file()


def _reference_perplexities(folder, config, x, windows):
    """Dense and compressed perplexity of ``windows``, with the whole model in memory."""
    from rankcut.evaluate import perplexity_of_windows

    model = rankcut.load(folder)
    dense, _ = perplexity_of_windows(model, windows, progress=False)
    rankcut.compress(model, config, x, progress=False)
    compressed, _ = perplexity_of_windows(model, windows, progress=False)
    return dense, compressed


@pytest.mark.parametrize("tied", [True, False])
def test_streaming_measures_held_out_perplexity_as_in_memory(tmp_path, tied):
    """The evaluation windows travel block by block; the head runs once at the end."""
    ckpt = save_checkpoint(tmp_path / "ckpt", tied=tied)
    x, held = calib(), calib(n=3, seq=48, seed=7)
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    meta = stream_compress(
        ckpt,
        config,
        x,
        tmp_path / "out",
        evaluation=held,
        evaluation_data="held",
        progress=False,
    )
    dense, compressed = _reference_perplexities(ckpt, config, x, held)
    ppl = meta["perplexity"]
    assert ppl["data"] == "held" and ppl["seq_len"] == 48
    assert ppl["dense"] == pytest.approx(dense, rel=1e-5)
    assert ppl["compressed"] == pytest.approx(compressed, rel=1e-5)
    assert ppl["compressed"] != pytest.approx(ppl["dense"], rel=1e-3)  # it did compress
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"{ppl['compressed']:.2f}" in report or f"{ppl['compressed']:.3f}" in report


def test_resumed_streaming_keeps_its_evaluation_and_counts_both_processes(
    tmp_path, sharded, monkeypatch
):
    x, held = calib(), calib(n=2, seq=40, seed=3)
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    ref = stream_compress(sharded, config, x, tmp_path / "ref", evaluation=held, progress=False)
    monkeypatch.setenv(streaming.FAULT_ENV, "1")
    with pytest.raises(InjectedFault):
        stream_compress(sharded, config, x, tmp_path / "out", evaluation=held, progress=False)
    monkeypatch.delenv(streaming.FAULT_ENV)
    state = json.loads((tmp_path / ".out.partial" / "work" / "state.json").read_text())
    first = state["elapsed_seconds"]
    assert first > 0
    # Changed evaluation windows are a changed input: no silent mix of two evaluations.
    with pytest.raises(RankcutError, match="cannot resume"):
        stream_compress(sharded, config, x, tmp_path / "out", evaluation=held + 1, progress=False)
    meta = stream_compress(sharded, config, x, tmp_path / "out", evaluation=held, progress=False)
    assert meta["perplexity"] == ref["perplexity"]
    assert meta["compression_seconds"] > first


def test_cli_streaming_reports_eval_data(tmp_path, tiny_tokenizer, calib_file, eval_file, capsys):
    from rankcut.cli import main

    ckpt = save_checkpoint(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(ckpt)
    args = ["compress", "--model", str(ckpt), "--method", "svd-llm", "--ratio", "0.3"]
    args += ["--pipeline", "sequential", "--calib", str(calib_file), "--samples", "4"]
    args += ["--seq-len", "32", "--eval-data", str(eval_file), "--out", str(tmp_path / "out")]
    assert main(["-q", *args]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "rankcut.json").read_text())
    ppl = meta["perplexity"]
    assert "streaming" in meta and ppl["data"] == str(eval_file)
    assert f"{ppl['dense']:.3f} -> {ppl['compressed']:.3f}" in printed
    assert "perplexity" in (tmp_path / "out" / "report.md").read_text()

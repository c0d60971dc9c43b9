"""The fast statistics passes against slow references written out here.

References: the Gram as a plain float64 ``X^T X`` of the inputs each module saw, one
window at a time with no gradient; the output Fisher from one backward per window with
every targeted weight requiring grad (what ``collect_fisher`` did before batching).
"""

from __future__ import annotations

import pytest
import torch

from rankcut.calibrate import collect, collect_fisher, collect_input_stats, collect_layer_stats
from rankcut.calibrate.collect import _sample_weights, fisher_batch_size
from rankcut.calibrate.lm_loss import IGNORE_INDEX, next_token_loss_grad
from rankcut.models import find_targets

from .conftest import tiny_gpt2, tiny_llama

RTOL = 1e-5


def _windows(count: int = 6, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (count, length), generator=torch.Generator().manual_seed(seed))


def reference_gram(model, modules, windows) -> dict[str, torch.Tensor]:
    """Float64 ``X^T X`` of each module's inputs, window by window, no gradient."""
    seen = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen[n].append(a[0].detach()))
        for n, m in modules.items()
    ]
    try:
        with torch.no_grad():
            for row in windows:
                model(input_ids=row[None])
    finally:
        for h in handles:
            h.remove()
    grams = {}
    for name, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        grams[name] = x.T @ x
    return grams


def _keeper(outs: dict, name: str):
    """A forward hook that keeps the output (and its gradient, after a backward)."""

    def hook(module, args, output):
        output.retain_grad()
        outs[name] = output

    return hook


def reference_fisher(model, modules, windows) -> tuple[dict, dict]:
    """Per-window backward with weight gradients: ``(fisher_in, fisher_out)`` in float64."""
    f_in = {n: 0.0 for n in modules}
    f_out = {n: 0.0 for n in modules}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    outs = {}
    handles = [m.register_forward_hook(_keeper(outs, n)) for n, m in modules.items()]
    try:
        for row in windows:
            ids = row[None]
            model(input_ids=ids, labels=ids).loss.backward()
            for name, module in modules.items():
                g = outs[name].grad.double()
                f_out[name] = f_out[name] + g.reshape(-1, g.shape[-1]).pow(2).sum(0)
                w = module.weight.grad.double()
                w = w if isinstance(module, torch.nn.Linear) else w.T
                f_in[name] = f_in[name] + w.pow(2).sum(0)
                module.weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return f_in, f_out


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to ``RTOL`` relative to the size of the expected statistic."""
    assert actual.dtype == torch.float64
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_combined_pass_equals_slow_references(make):
    """Gram and output Fisher from the one batched forward+backward equal the float64
    Gram of a no-grad pass and the per-window backward with weight gradients."""
    model = make()
    modules = find_targets(model)
    windows = _windows()
    stats = collect_layer_stats(model, modules, windows, frozenset({"gram", "fisher_out"}), False)
    grams = reference_gram(model, modules, windows)
    _, f_out = reference_fisher(model, modules, windows)
    for name in modules:
        assert_close(stats[name].inputs.gram, grams[name])
        assert stats[name].inputs.tokens == windows.numel()
        assert_close(stats[name].fisher_out, f_out[name])
        assert stats[name].fisher_in is None


def test_batched_gram_pass_equals_the_float64_reference():
    """Gram only (no gradient needed): windows share a forward, sums stay exact."""
    model = tiny_llama()
    modules = find_targets(model)
    windows = _windows(count=5)
    stats = collect_layer_stats(model, modules, windows, frozenset({"gram", "abs_mean"}), False)
    grams = reference_gram(model, modules, windows)
    for name in modules:
        assert_close(stats[name].inputs.gram, grams[name])
        assert stats[name].inputs.tokens == windows.numel()
        assert stats[name].fisher_out is None


def test_combined_pass_equals_separate_passes():
    model = tiny_llama()
    modules = find_targets(model)
    windows = _windows()
    both = collect_layer_stats(model, modules, windows, frozenset({"gram", "fisher_out"}), False)
    grams = collect_input_stats(model, modules, windows, progress=False)
    _, f_out = collect_fisher(model, modules, windows, progress=False, weights=False, outputs=True)
    for name in modules:
        assert_close(both[name].inputs.gram, grams[name].gram)
        assert_close(both[name].fisher_out, f_out[name])
    # q/k/v and gate/up still share one statistic
    layer = "model.layers.0."
    q, k, v = (both[f"{layer}self_attn.{p}_proj"].inputs for p in "qkv")
    assert q is k is v
    assert both[f"{layer}mlp.gate_proj"].inputs is both[f"{layer}mlp.up_proj"].inputs


@pytest.mark.parametrize("batch_size", [2, 4, 5])
def test_batched_output_fisher_equals_one_window_at_a_time(batch_size):
    """Any batch size (a last partial batch included) gives the per-window sums."""
    model = tiny_llama()
    modules = find_targets(model)
    windows = _windows(count=7)
    _, one = collect_fisher(
        model, modules, windows, progress=False, weights=False, outputs=True, batch_size=1
    )
    _, batched = collect_fisher(
        model, modules, windows, progress=False, weights=False, outputs=True, batch_size=batch_size
    )
    for name in modules:
        assert_close(batched[name], one[name])


def test_weight_fisher_with_gram_in_one_pass_equals_references():
    """FWSVD's weight Fisher (per window) and the Gram, gathered together."""
    model = tiny_llama()
    modules = find_targets(model)
    windows = _windows(count=3)
    needs = frozenset({"gram", "fisher", "fisher_out"})
    stats = collect_layer_stats(model, modules, windows, needs, False)
    grams = reference_gram(model, modules, windows)
    f_in, f_out = reference_fisher(model, modules, windows)
    for name in modules:
        assert_close(stats[name].inputs.gram, grams[name])
        assert_close(stats[name].fisher_in, f_in[name])
        assert_close(stats[name].fisher_out, f_out[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_next_token_loss_grad_equals_autograd_of_the_model_loss(dtype, in_place, monkeypatch):
    """The closed-form gradient equals autograd of transformers' ``ForCausalLMLoss``,
    ignored labels, several row chunks, a scale and a bfloat16 model's logits included."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setattr("rankcut.calibrate.lm_loss.CHUNK_ELEMENTS", 3 * 11)  # 3 rows a chunk
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 7, 11, generator=gen)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, 3] = labels[2, 1] = IGNORE_INDEX
    (expected,) = torch.autograd.grad(2.5 * ForCausalLMLoss(logits, labels, 11), logits)
    values = logits.detach().clone()
    grad = next_token_loss_grad(values, labels, 2.5, out=values if in_place else None)
    assert grad.dtype == dtype and (grad is values) == in_place
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), expected.float(), rtol=tol, atol=tol)
    assert not grad[:, -1].any() and not grad[0, 2].any()  # no label: no gradient


def test_next_token_loss_grad_rejects_windows_without_labels():
    with pytest.raises(ValueError, match="no position"):
        next_token_loss_grad(torch.zeros(2, 1, 5), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        next_token_loss_grad(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="contiguous"):
        logits = torch.zeros(2, 5, 3).transpose(1, 2)
        next_token_loss_grad(logits, torch.zeros(2, 3, dtype=torch.long), out=logits)


def test_next_token_loss_grad_of_non_contiguous_logits_gets_its_own_buffer():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 4, generator=gen).transpose(1, 2).requires_grad_(True)  # (2, 4, 9)
    labels = torch.randint(0, 9, (2, 4), generator=gen)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1)
    )
    (expected,) = torch.autograd.grad(loss, logits)
    grad = next_token_loss_grad(logits.detach(), labels)
    assert grad.is_contiguous()
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("saved", [False, True], ids=["head-output", "saved-by-the-graph"])
def test_fisher_pass_writes_the_loss_gradient_over_logits_only_when_nothing_reads_them(saved):
    """Logits that the backward reads (here: the output of ``exp``, which ``exp``'s
    backward reuses) get a buffer of their own; either way the Fisher equals the
    reference's through the model's own loss."""
    model = tiny_llama()
    modules = find_targets(model)
    windows = _windows(count=4)
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: out.exp() if saved else None)
    calls = []
    original = collect.next_token_loss_grad

    def spy(values, labels, scale, out=None):
        calls.append(out is values)
        return original(values, labels, scale, out=out)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(collect, "next_token_loss_grad", spy)
            stats = collect_layer_stats(model, modules, windows, frozenset({"fisher_out"}), False)
        _, f_out = reference_fisher(model, modules, windows)
    finally:
        handle.remove()
    assert calls and all(c == (not saved) for c in calls)
    for name in modules:
        assert_close(stats[name].fisher_out, f_out[name])


def test_output_fisher_takes_no_parameter_gradient():
    """No parameter requires grad during the pass, none keeps a ``.grad``, and each
    parameter's own ``requires_grad`` is restored afterwards."""
    model = tiny_llama()
    modules = find_targets(model)
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)  # a mix, to see each flag restored
    flags = [p.requires_grad for p in params]
    during = []
    handle = model.model.layers[1].register_forward_hook(
        lambda *a: during.append(any(p.requires_grad for p in params))
    )
    try:
        collect_layer_stats(model, modules, _windows(), frozenset({"gram", "fisher_out"}), False)
    finally:
        handle.remove()
    assert during and not any(during)
    assert all(p.grad is None for p in params)
    assert [p.requires_grad for p in params] == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_default_batch_size_is_bounded_and_only_for_a_token_mean_loss():
    model = tiny_llama()
    assert fisher_batch_size(model, _windows(length=256)) == 8
    assert fisher_batch_size(model, _windows(length=512)) == 4
    assert fisher_batch_size(model, _windows(length=4096)) == 1
    model.loss_function = lambda *a, **k: None  # a custom loss: one window at a time
    assert fisher_batch_size(model, _windows(length=256)) == 1


def test_sample_weights_make_unequal_windows_exact():
    """With ignored labels the windows' valid-token counts differ; the weights turn the
    batch's output gradient into each window's own, exactly as HF's loss is defined."""
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    ids = _windows(count=3)
    labels = ids.clone()
    labels[0, 10:] = -100
    labels[2, 5:9] = -100
    assert _sample_weights(ids) is None
    weights = _sample_weights(labels)
    for p in model.parameters():
        p.requires_grad_(False)
    lin.weight.requires_grad_(True)
    out = {}
    handle = lin.register_forward_hook(_keeper(out, "y"))
    try:
        (len(ids) * model(input_ids=ids, labels=labels).loss).backward()
        batch = out["y"].grad.double().pow(2).sum(1) * weights[:, None]
        own = []
        for row, lab in zip(ids, labels, strict=True):
            model(input_ids=row[None], labels=lab[None]).loss.backward()
            own.append(out["y"].grad.double().pow(2).sum(1)[0])
    finally:
        handle.remove()
    assert_close(batch, torch.stack(own))


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)], ids=["square", "tall", "wide"])
def test_whitened_spectrum_equals_the_full_svd(shape):
    """The allocation's eigh-based spectra and scores equal those of a full float64 SVD,
    on a weight whose spectrum spans six decades (an ill-conditioned whitening)."""
    from rankcut.pipelines.plan import whitened_spectrum

    gen = torch.Generator().manual_seed(3)
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    weight = (u * torch.logspace(2, -4, k, dtype=torch.float64)) @ v.T
    fisher = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
    s, scores = whitened_spectrum(weight, fisher)
    uu, ss, _ = torch.linalg.svd(weight, full_matrices=False)
    want = ss**2 * (uu**2 * fisher[:, None]).sum(0)
    torch.testing.assert_close(s, ss, rtol=1e-6, atol=1e-9 * float(ss[0]))
    torch.testing.assert_close(scores, want, rtol=1e-6, atol=1e-12 * float(want.max()))
    # the directions the allocation weighs (not the noise floor) to 1e-6 relative
    big = ss > 1e-3 * ss[0]
    torch.testing.assert_close(scores[big], want[big], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(whitened_spectrum(weight)[0], torch.linalg.svdvals(weight))


def test_plan_ranks_unchanged_by_the_fast_spectra():
    """The default global allocation of a tiny model, planned on the fast statistics and
    spectra, gives the ranks of the slow references (per-window Fisher, full SVD)."""
    from rankcut.methods import SvdLlmConfig
    from rankcut.pipelines.plan import make_plan
    from rankcut.rank import allocate
    from rankcut.rank.allocators import AllocationInput

    model = tiny_llama(num_hidden_layers=3)
    windows = _windows(count=6, length=32)
    config = SvdLlmConfig(ratio=0.4)
    plan = make_plan(model, config, windows, progress=False, pipeline="sequential")
    modules = plan.modules
    grams = reference_gram(model, modules, windows)
    _, f_out = reference_fisher(model, modules, windows)
    from rankcut.decompose import psd_cholesky

    scores = {}
    for name, module in modules.items():
        w = module.weight.detach().double() @ psd_cholesky(grams[name], eps=config.eps)
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
        scores[name] = s**2 * (u**2 * f_out[name][:, None]).sum(0)
    inp = AllocationInput(
        shapes=plan.shapes,
        ratio=config.ratio,
        min_rank_fraction=config.min_rank_fraction,
        options=dict(config.allocation_options),
        rank_multiple=config.rank_multiple,
        min_speedup=config.min_speedup,
        spectra={n: torch.ones(1) for n in modules},
        component_scores=scores,
    )
    assert config.allocation == "global"
    assert allocate("global", inp) == {n: plan.ranks[n] for n in modules}


def test_allocation_fisher_takes_the_first_windows_holding_fisher_tokens(monkeypatch):
    """Statistics that only feed the allocation (sequential pipeline) back-propagate the
    first windows holding ``fisher_tokens`` tokens; the whole pipeline, a loss-table
    allocation, ``fisher_tokens=0`` and a budget above the windows back-propagate all."""
    import dataclasses

    from rankcut.methods import SvdLlmConfig
    from rankcut.pipelines import plan as plan_module

    model = tiny_llama(num_hidden_layers=2)
    windows = _windows(count=10, length=32)
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", fisher_tokens=70)
    assert plan_module.fisher_windows(model, config, windows) == 3  # ceil(70 / 32)
    for other in (
        dataclasses.replace(config, pipeline="whole"),
        dataclasses.replace(config, fisher_tokens=0),
        dataclasses.replace(config, fisher_tokens=32 * 10),
        dataclasses.replace(config, allocation="sensitivity"),
    ):
        assert plan_module.fisher_windows(model, other, windows) is None

    seen = []
    real = plan_module.collect_layer_stats

    def spy(model, modules, calibration, needs, progress=True, grad_windows=None, keep=None):
        seen.append((calibration.shape[0], grad_windows))
        return real(
            model, modules, calibration, needs, progress, grad_windows=grad_windows, keep=keep
        )

    monkeypatch.setattr(plan_module, "collect_layer_stats", spy)
    plan_module.make_plan(model, config, windows, progress=False)
    assert seen == [(10, 3)]


@pytest.mark.parametrize("grad_windows", [1, 3, 5])
def test_fisher_on_leading_windows_gram_on_all(grad_windows):
    """With ``grad_windows`` the Gram still sums every window (the rest run forward only,
    stopped before the head) and the output Fisher sums the first windows only."""
    model = tiny_llama(num_hidden_layers=2)
    modules = find_targets(model)
    windows = _windows(count=7, length=16)
    needs = frozenset({"gram", "fisher_out"})
    stats = collect_layer_stats(model, modules, windows, needs, False, grad_windows=grad_windows)
    grams = reference_gram(model, modules, windows)
    _, f_out = reference_fisher(model, modules, windows[:grad_windows])
    for name in modules:
        assert_close(stats[name].inputs.gram, grams[name])
        assert_close(stats[name].fisher_out, f_out[name])
        assert stats[name].inputs.tokens == windows.numel()


def test_fisher_tokens_is_checked():
    from rankcut.errors import ConfigError
    from rankcut.methods import SvdLlmConfig

    for bad in (-1, 1.5, True, "4096"):
        with pytest.raises(ConfigError, match="fisher_tokens"):
            SvdLlmConfig(fisher_tokens=bad)


def test_map_one_thread_each_keeps_order_and_restores_the_thread_count():
    from rankcut.decompose.threads import map_one_thread_each

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = map_one_thread_each(lambda x: (x, torch.get_num_threads()), list(range(7)))
        assert got == [(x, 1) for x in range(7)]
        assert torch.get_num_threads() == 2

        def fail(x):
            raise ValueError(x)

        with pytest.raises(ValueError):
            map_one_thread_each(fail, [1, 2])
        assert torch.get_num_threads() == 2
        assert map_one_thread_each(lambda x: x + 1, [1], workers=1) == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("width,rows", [(1, None), (7, 3), (64, None), (200, None), (130, 64)])
def test_symmetric_gram_blocks_equal_the_full_product(width, rows):
    """``add_gram(acc, x, x)`` (lower blocks, mirrored) equals a float64 ``x^T x``, and a
    cross product ``add_gram(acc, x, y)`` is untouched by it."""
    from rankcut.calibrate.stats import add_gram

    gen = torch.Generator().manual_seed(width)
    x = torch.randn(300, width, generator=gen)
    acc = torch.full((width, width), 2.0, dtype=torch.float64)  # sums onto what is there
    add_gram(acc, x, x, rows=rows)
    expected = x.double().T @ x.double() + 2.0
    torch.testing.assert_close(acc, expected, rtol=RTOL, atol=1e-4)
    y = torch.randn(300, 5, generator=gen)
    cross = add_gram(torch.zeros(width, 5, dtype=torch.float64), x, y, rows=rows)
    torch.testing.assert_close(cross, x.double().T @ y.double(), rtol=RTOL, atol=1e-4)

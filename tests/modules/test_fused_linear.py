"""Fused q/k/v and gate/up products (modules.fused_linear) against the model's own layers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from continual_transformer.backbone import model_fingerprint
from continual_transformer.modules.fused_linear import GROUPS, FusedGroup, FusedMember, Fusion


def _ids(tokenizer, rows: int = 3, width: int = 11) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (rows, width), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _fused_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, FusedMember)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_products_give_the_models_logits(tokenizer, dtype):
    """Every layer's q/k/v and gate/up computed as one product each: the same logits (float32: bit for bit
    on this CPU's kernels, bfloat16: within rounding)."""
    model = tiny_llama(tokenizer).to(dtype)
    ids = _ids(tokenizer)
    reference = _logits(model, ids)
    fusion = Fusion()
    groups = fusion.install(model)
    try:
        assert len(groups) == len(GROUPS) * model.config.num_hidden_layers
        assert len(_fused_names(model)) == 5 * model.config.num_hidden_layers
        fused = _logits(model, ids)
        assert all(g.input is None and all(p is None for p in g.pending) for g in groups), "nothing kept"
    finally:
        fusion.remove()
    if dtype == torch.float32:
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)
    assert fused.argmax(-1).eq(reference.argmax(-1)).float().mean() > 0.95


def test_reduced_products_of_few_rows_give_the_models_logits(tokenizer, monkeypatch):
    """With reduced_rows, every linear layer of a layer stands in (o_proj and down_proj as groups of one,
    reading their layers' own weights) and products of up to that many rows are multiply-and-sum reductions
    where compiled: a one-token step gives the model's logits, and a prompt of more rows takes the library
    product (the same logits as well)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # reductions as compiled, run eagerly
    model = tiny_llama(tokenizer)
    ids = _ids(tokenizer, rows=1, width=1)
    prompt = _ids(tokenizer)
    reference, reference_prompt = _logits(model, ids), _logits(model, prompt)
    fusion = Fusion()
    groups = fusion.install(model, reduced_rows=1)
    try:
        assert len(groups) == 4 * model.config.num_hidden_layers
        assert len(_fused_names(model)) == 7 * model.config.num_hidden_layers
        reduced, prompted = _logits(model, ids), _logits(model, prompt)
    finally:
        fusion.remove()
    torch.testing.assert_close(reduced, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(prompted, reference_prompt, rtol=0, atol=1e-5)
    single = next(g for g in groups if g.names == ("o_proj",))
    assert single.weight.data_ptr() == single.originals[0].weight.data_ptr(), "no copy for a group of one"
    # a call without reductions installs two groups a layer and keeps the groups of one for the next
    assert len(fusion.install(model)) == 2 * model.config.num_hidden_layers
    fusion.remove()
    again = fusion.install(model, reduced_rows=1)
    fusion.remove()
    assert {id(g) for g in again} == {id(g) for g in groups}, "nothing built again"


def test_reduced_product_is_the_linear_product():
    generator = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(2, 1, 8, generator=generator), torch.randn(5, 8), torch.randn(5)
    from continual_transformer.modules.fused_linear import reduced_product

    torch.testing.assert_close(
        reduced_product(hidden, weight, bias), nn.functional.linear(hidden, weight, bias)
    )
    torch.testing.assert_close(reduced_product(hidden, weight, None), hidden @ weight.T)


def test_removing_the_fusion_restores_the_model(tokenizer):
    """While fused the model's parameters and state_dict are its own; after remove() it holds its own layers
    again: same modules, parameters, state_dict and fingerprint; installing again sees weights changed in
    place in between."""
    model = tiny_llama(tokenizer)
    ids = _ids(tokenizer)
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = model_fingerprint(model)
    parameters = dict(model.named_parameters())
    fusion = Fusion()
    fusion.install(model)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in parameters.items()}
    assert set(model.state_dict()) == set(state), "fused weights are not part of the state"
    assert model_fingerprint(model) == fingerprint
    fusion.remove()
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model_fingerprint(model) == fingerprint
    assert not _fused_names(model)

    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.data.mul_(-1)  # in place, bypassing version counters
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    changed = _logits(model, ids)
    fusion.install(model)
    try:
        torch.testing.assert_close(_logits(model, ids), changed, rtol=0, atol=1e-5)
    finally:
        fusion.remove()
    with pytest.raises(RuntimeError, match="installed already"):
        fusion.install(model)
        fusion.install(model)
    fusion.remove()


def test_fused_weights_are_copied_again_only_when_the_stamp_or_a_weight_changed(tokenizer):
    """With a stamp (the backbone's count of trainings) an install copies the weights again only when the
    stamp, a weight's version or its storage changed: a write the version counter does not see (an
    optimiser's in-place step) is covered by the stamp the training bumps."""
    model = tiny_llama(tokenizer, layers=1)
    ids = _ids(tokenizer)
    fusion = Fusion()

    def fused_logits(stamp):
        fusion.install(model, stamp=stamp)
        try:
            return _logits(model, ids)
        finally:
            fusion.remove()

    fused_logits(0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)  # a version bump: seen
    torch.testing.assert_close(fused_logits(0), _logits(model, ids), rtol=0, atol=1e-5)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.data.mul_(-1)  # unseen by the version counter
    assert not torch.allclose(fused_logits(0), _logits(model, ids)), "the same stamp: not copied again"
    torch.testing.assert_close(fused_logits(1), _logits(model, ids), rtol=0, atol=1e-5)


def test_wrapped_or_hooked_layers_keep_their_own_products(tokenizer):
    """LoRA on q/v (peft), a hook on one layer's k_proj: those layers' attention keeps its own products; the
    MLPs and the other layers are fused; hooks on a parent (the MLP) still run; logits unchanged."""
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_llama(tokenizer, layers=4)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])
    inject_adapter_in_model(config, model, adapter_name="default")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter changes the output
    calls: list[int] = []
    k_hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, o: o * 2)
    mlp_hook = model.model.layers[3].mlp.register_forward_hook(lambda m, a, o: calls.append(1))
    ids = _ids(tokenizer)
    reference = _logits(model, ids)
    fusion = Fusion()
    fusion.install(model)
    try:
        fused = _fused_names(model)
        calls.clear()
        out = _logits(model, ids)
    finally:
        fusion.remove()
    attention = {f"model.layers.{i}.self_attn.{n}" for i in (3,) for n in ("q_proj", "k_proj", "v_proj")}
    mlp = {f"model.layers.{i}.mlp.{n}" for i in range(4) for n in ("gate_proj", "up_proj")}
    assert fused == attention | mlp
    assert calls == [1], "the MLP's own hook ran"
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    k_hook.remove()
    mlp_hook.remove()


def test_a_group_whose_layers_were_replaced_is_built_again(tokenizer):
    """A layer swapped by a strategy between calls (here a fresh nn.Linear) is fused from its new weights."""
    model = tiny_llama(tokenizer)
    ids = _ids(tokenizer)
    fusion = Fusion()
    fusion.install(model)
    fusion.remove()
    attention = model.model.layers[2].self_attn
    new = nn.Linear(attention.v_proj.in_features, attention.v_proj.out_features, bias=False)
    attention.v_proj = new
    reference = _logits(model, ids)
    fusion.install(model)
    try:
        assert attention.v_proj is not new and isinstance(attention.v_proj, FusedMember)
        out = _logits(model, ids)
    finally:
        fusion.remove()
    assert attention.v_proj is new
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_fused_weights_made_inside_inference_mode_refresh_outside_it(tokenizer):
    """generate runs inside inference mode; a group made there is refreshed by a later call outside it."""
    model = tiny_llama(tokenizer)
    ids = _ids(tokenizer)
    fusion = Fusion()
    with torch.inference_mode():
        fusion.install(model)
        fusion.remove()
    reference = _logits(model, ids)
    fusion.install(model)
    try:
        out = _logits(model, ids)
    finally:
        fusion.remove()
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_a_model_moved_to_another_dtype_is_fused_again(tokenizer):
    """model.to(dtype) keeps the modules and replaces their tensors: the fused weights follow."""
    model = tiny_llama(tokenizer)
    ids = _ids(tokenizer)
    fusion = Fusion()
    fusion.install(model)
    fusion.remove()
    model.to(torch.bfloat16)
    reference = _logits(model, ids)
    fusion.install(model)
    try:
        assert all(g.weight.dtype == torch.bfloat16 for g in fusion.groups.values())
        out = _logits(model, ids)
    finally:
        fusion.remove()
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)


def test_members_called_out_of_order_or_on_other_inputs_compute_their_own(tokenizer):
    """The kept slices serve only the input they came from: a member called first, or on another tensor,
    computes the group's product itself."""
    layer = tiny_llama(tokenizer).model.layers[0].self_attn
    q, k, v = layer.q_proj, layer.k_proj, layer.v_proj
    x, y = torch.randn(2, 3, q.in_features), torch.randn(2, 3, q.in_features)
    fusion = Fusion()
    fusion.install(layer)
    try:
        with torch.inference_mode():
            got = [layer.v_proj(x), layer.q_proj(y), layer.k_proj(x), layer.k_proj(y), layer.v_proj(y)]
            want = [v(x), q(y), k(x), k(y), v(y)]
    finally:
        fusion.remove()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_kept_walk_keeps_its_candidates_but_hooks_and_new_layers_still_count(tokenizer):
    """Installed with the same walk of modules, the groups to look at are not searched for again; a hook
    added since still leaves its layer alone, and a new walk (a layer swapped in) is searched again."""
    from continual_transformer.backbone import _ModuleWalk

    model = tiny_llama(tokenizer, layers=2)
    walk = _ModuleWalk()
    fusion = Fusion()
    first = walk(model)
    fusion.install(model, first)
    fusion.remove()
    assert walk(model) is first, "the fusion left the model's modules as they were"
    hook = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, o: None)
    fusion.install(model, walk(model))
    try:
        assert "model.layers.1.mlp.gate_proj" not in _fused_names(model), "a hooked layer keeps its product"
        assert "model.layers.0.mlp.gate_proj" in _fused_names(model)
    finally:
        fusion.remove()
    hook.remove()
    attention = model.model.layers[0].self_attn
    attention.k_proj = nn.Linear(attention.k_proj.in_features, attention.k_proj.out_features, bias=True)
    second = walk(model)
    assert second is not first
    fusion.install(model, second)
    try:
        fused = _fused_names(model)
    finally:
        fusion.remove()
    assert "model.layers.0.self_attn.q_proj" not in fused, "a member with a bias the others lack: unfused"
    assert "model.layers.1.self_attn.q_proj" in fused and "model.layers.1.mlp.gate_proj" in fused
    with pytest.raises(RuntimeError, match="installed already"):
        fusion.install(model, second)
        fusion.install(model, second)
    fusion.remove()


def test_a_repeated_install_repeats_the_last_until_something_it_checked_changed(tokenizer, monkeypatch):
    """Installed again with the same walk, stamp and rows, and nothing about the layers changed, the same
    groups go in without being checked or copied again; a weight written in place, a hook on a member, a
    write only the stamp covers, each is seen by the next install."""
    from continual_transformer.backbone import _ModuleWalk

    model = tiny_llama(tokenizer, layers=2)
    ids = _ids(tokenizer)
    walk, fusion = _ModuleWalk(), Fusion()
    copies: list[FusedGroup] = []
    refresh = FusedGroup.refresh
    monkeypatch.setattr(
        FusedGroup, "refresh", lambda self, stamp=None: copies.append(self) or refresh(self, stamp)
    )

    def installed(stamp: int) -> tuple[list[FusedGroup], torch.Tensor]:
        groups = fusion.install(model, walk(model), stamp=stamp)
        try:
            return groups, _logits(model, ids)
        finally:
            fusion.remove()

    first, _ = installed(0)
    copies.clear()
    again, _ = installed(0)
    assert [id(g) for g in again] == [id(g) for g in first] and not copies, "repeated without checks"
    up = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        up.weight.add_(0.5)  # a version bump
    _, out = installed(0)
    assert copies, "checked again"
    torch.testing.assert_close(out, _logits(model, ids), rtol=0, atol=1e-5)
    hook = up.register_forward_hook(lambda m, a, o: o * 2)
    fusion.install(model, walk(model), stamp=0)
    try:
        assert "model.layers.0.mlp.up_proj" not in _fused_names(model), "a hooked member keeps its product"
        out = _logits(model, ids)
    finally:
        fusion.remove()
    torch.testing.assert_close(out, _logits(model, ids), rtol=0, atol=1e-5)
    hook.remove()
    with torch.no_grad():
        up.weight.data.mul_(-1)  # unseen by the version counter: only a new stamp shows it
    _, out = installed(1)
    torch.testing.assert_close(out, _logits(model, ids), rtol=0, atol=1e-5)

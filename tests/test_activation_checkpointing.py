"""Activation checkpointing policies (model/recompute.py): `full` and `selective`, on every layer or every
k-th, give the loss and gradients of `none`; the config's old boolean still works.

Tolerance: recomputation runs the very same fp32 ops on the same inputs, so values are equal up to
the order autograd sums a gradient's contributions; 1e-6 relative to each tensor's largest gradient
(observed: exact). That the policies free memory is measured in test_plan_activations.py.
"""
from __future__ import annotations

import pytest
import torch

import lingshu_fast.model as M
from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from lingshu_fast.model.checkpoint_io import full_hf_state_dict
from lingshu_fast.model.testing import model_inputs, packed_batch

pytestmark = pytest.mark.usefixtures("world_of_one")


def _loss_and_grads(config, batch, policy, every_k=1):
    model = M.build_model(config, seed=5, activation_checkpointing=policy, checkpoint_every_k_layers=every_k)
    out = model(**model_inputs(batch))
    labels = torch.roll(batch["input_ids"], -1)
    loss = fused_linear_cross_entropy(out.hidden_states, model.lm_head_weight, labels, reduction="sum")
    loss.backward()
    return loss.detach(), full_hf_state_dict(model, grads=True), model


@pytest.fixture(scope="module")
def setup():
    config = M.tiny_hf_config(num_hidden_layers=4)
    return config, packed_batch(config)


@pytest.fixture(scope="module")
def reference(setup):
    config, batch = setup
    return _loss_and_grads(config, batch, "none")[:2]


@pytest.mark.parametrize("policy,every_k", [("full", 1), ("selective", 1), ("full", 2), ("selective", 3)])
def test_policy_gives_the_same_loss_and_gradients(setup, reference, policy, every_k):
    """Pins: recomputation loses or changes no gradient: the ViT blocks and decoder layers under full
    checkpointing, the attention core and the MLP activation (dropped from the down projection's saved
    input, rebuilt from gate/up) under selective, and the every-k selection."""
    config, batch = setup
    loss0, grads0 = reference
    loss, grads, model = _loss_and_grads(config, batch, policy, every_k)
    torch.testing.assert_close(loss, loss0, atol=0, rtol=1e-6)
    assert grads.keys() == grads0.keys()
    for name, g0 in grads0.items():
        scale = g0.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name] / scale, g0 / scale, atol=1e-6, rtol=0, msg=name)
    chosen = [i for i in range(config.text_config.num_hidden_layers) if i % every_k == 0]
    if policy == "selective":
        assert [layer.layer_id for layer in model.layers if layer.selective] == chosen
        blocks = [j for j, b in enumerate(model.visual.blocks) if b.selective]
        assert blocks == [j for j in range(4) if j % every_k == 0]
    else:
        assert sorted(model._full_layers) == chosen and not any(layer.selective for layer in model.layers)


def test_selective_recomputes_in_backward(setup):
    """Pins that selective really recomputes: the MLP activation runs again during backward (a policy
    that silently kept its output would run it once per layer)."""
    import lingshu_fast.model.language as language

    config, batch = setup
    calls = {"n": 0}
    original = language.swiglu

    def counting(gate, up):
        calls["n"] += 1
        return original(gate, up)

    language.swiglu = counting
    try:
        _loss_and_grads(config, batch, "none")
        plain = calls["n"]
        calls["n"] = 0
        _loss_and_grads(config, batch, "selective")
    finally:
        language.swiglu = original
    layers = config.text_config.num_hidden_layers
    assert plain == layers and calls["n"] == 3 * layers  # forward, down's saved input, the activation's backward


def test_policy_names_and_old_booleans():
    """Pins the config contract: none|full|selective, true/false still accepted as full/none (with a
    deprecation line), bad values and k < 1 rejected in one line; the model takes the same names."""
    from lingshu_fast.config import ConfigError, load_config

    assert load_config("tiny-sft", ["model.activation_checkpointing=true"]).model.activation_checkpointing == "full"
    assert load_config("tiny-sft", ["model.activation_checkpointing=false"]).model.activation_checkpointing == "none"
    cfg = load_config("tiny-sft", ["model.activation_checkpointing=selective", "model.checkpoint_every_k_layers=2"])
    assert (cfg.model.activation_checkpointing, cfg.model.checkpoint_every_k_layers) == ("selective", 2)
    with pytest.raises(ConfigError, match="selective"):
        load_config("tiny-sft", ["model.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match="checkpoint_every_k_layers"):
        load_config("tiny-sft", ["model.checkpoint_every_k_layers=0"])
    model = M.build_model(M.tiny_hf_config(), activation_checkpointing=True)
    assert model.activation_checkpointing == "full"
    with pytest.raises(ValueError, match="policy"):
        model.activation_checkpointing = "partial"

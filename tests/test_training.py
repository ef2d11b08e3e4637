"""The one training loop (training.train) against a slow reference, and its plug points."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_backbone

from continual_transformer import training
from continual_transformer.backbone import sequence_nll
from continual_transformer.config import ConfigError, OptimArgs, WindowArgs, from_dict, nest_legacy_keys

TEXT = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark. " * 3


def _params(backbone) -> list[torch.nn.Parameter]:
    return list(backbone.layers[-1].parameters())


def reference_train(backbone, examples, params, optim: OptimArgs, seed: int) -> list[float]:
    """The loop written out plainly: shuffle, collate, mean NLL over scored tokens, clip, step."""
    opt = training.make_optimizer(params, optim.optimizer, optim.learning_rate, optim.weight_decay)
    order, rng, losses = list(range(len(examples))), random.Random(seed), []
    for p in params:
        p.requires_grad_(True)
    backbone.model.train()
    for _ in range(optim.epochs):
        rng.shuffle(order)
        epoch = []
        for start in range(0, len(order), optim.batch_size):
            chosen = [examples[i] for i in order[start : start + optim.batch_size]]
            batch = training.collate(chosen, backbone.tokenizer.pad_token_id, backbone.device)
            logits = backbone.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            nll = sequence_nll(logits, batch["labels"])
            loss = nll.sum() / (batch["labels"][:, 1:] != -100).sum()
            loss.backward()
            if optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            opt.step()
            opt.zero_grad()
            epoch.append(loss.item())
        losses += epoch
        if optim.stop_loss and sum(epoch) / len(epoch) < optim.stop_loss:
            break
    backbone.model.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_train_matches_the_reference_loop_bit_for_bit(tokenizer, optimizer):
    optim = OptimArgs(optimizer=optimizer, learning_rate=1e-2, epochs=3, batch_size=2, stop_loss=0.0)
    a, b = make_backbone(tokenizer), make_backbone(tokenizer)
    examples = training.window_examples(a, TEXT, WindowArgs(window=16, context=4))
    assert len(examples) > 4
    fast = training.train(a, examples, _params(a), optim, seed=7)
    slow = reference_train(b, examples, _params(b), optim, seed=7)
    assert fast == slow and fast[-1] < fast[0]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training


def test_stop_loss_ends_training_after_the_epoch(tokenizer):
    backbone = make_backbone(tokenizer)
    examples = training.window_examples(backbone, TEXT, WindowArgs(window=16, context=4))
    steps = -(-len(examples) // 8)
    losses = training.train(backbone, examples, _params(backbone), OptimArgs(epochs=5, stop_loss=100.0))
    assert len(losses) == steps


def test_custom_loss_sees_padded_extras_and_hooks_run(tokenizer):
    backbone = make_backbone(tokenizer)
    base = training.window_examples(backbone, TEXT, WindowArgs(window=16, context=4))[:3]
    examples = [
        training.Example(e.input_ids, e.labels, {"teacher": torch.full((i + 1, 2), float(i + 1))})
        for i, e in enumerate(base)
    ]
    seen, hooked, regularized = [], [], []

    def loss_fn(bb, batch):
        seen.append(batch["teacher"].clone())
        return training.next_token_loss(bb, batch)

    def regularizer():
        regularized.append(1)
        return torch.zeros((), requires_grad=True)

    training.train(
        backbone,
        examples,
        _params(backbone),
        OptimArgs(epochs=1, batch_size=3),
        loss_fn=loss_fn,
        regularizer=regularizer,
        grad_hook=lambda params: hooked.append(all(p.grad is not None for p in params)),
    )
    assert len(seen) == 1 and seen[0].shape == (3, 3, 2)
    for row in range(3):  # each example's own rows, zero-padded to the longest (3)
        v = int(seen[0][row, 0, 0])
        assert torch.equal(seen[0][row, :v], torch.full((v, 2), float(v)))
        assert not seen[0][row, v:].any()
    assert sorted(int(seen[0][row, 0, 0]) for row in range(3)) == [1, 2, 3]
    assert hooked == [True] and regularized == [1]


def test_collate_refuses_mixed_extras():
    a = training.Example((1, 2), (1, 2), {"t": torch.zeros(2)})
    b = training.Example((1, 2), (1, 2))
    with pytest.raises(ValueError, match="same extras"):
        training.collate([a, b], 0, torch.device("cpu"))


def test_optim_args_validation_and_legacy_keys():
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        OptimArgs(learning_rate=0)
    with pytest.raises(ConfigError, match="optim.optimizer"):
        OptimArgs(optimizer="adam")
    with pytest.raises(ConfigError, match="windows.context"):
        WindowArgs(window=8, context=8)
    from continual_transformer.strategies.finetune import FinetuneConfig

    flat = {"layers": "-1:", "learning_rate": 3e-3, "epochs": 3, "window_tokens": 64, "context_tokens": 8}
    nested = nest_legacy_keys(FinetuneConfig, flat)
    assert nested == {
        "layers": "-1:",
        "optim": {"learning_rate": 3e-3, "epochs": 3},
        "windows": {"window": 64, "context": 8},
    }
    config = from_dict(FinetuneConfig, nested)
    assert config.optim == OptimArgs(learning_rate=3e-3, epochs=3) and config.windows.window == 64
    # a flat key is what a user gave (file, --set, spec) over a resolved section: it wins
    assert nest_legacy_keys(FinetuneConfig, {"epochs": 2, "optim": {"epochs": 3}}) == {"optim": {"epochs": 2}}
    assert nest_legacy_keys(OptimArgs, {"epochs": 2}) == {"epochs": 2}  # a field of its own: untouched


def test_left_pad_right_aligns_rows_with_their_mask_and_positions():
    ids, mask, positions = training.left_pad([[1, 2, 3], [4], [5, 6]], 0, torch.device("cpu"), offset=10)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions.tolist() == [[10, 11, 12], [10, 10, 10], [10, 10, 11]]
    assert ids.is_contiguous()
    aligned, lengths = training.right_aligned([[7], [8, 9]], -1, torch.device("cpu"))
    assert aligned.tolist() == [[-1, 7], [8, 9]] and lengths.tolist() == [1, 2]

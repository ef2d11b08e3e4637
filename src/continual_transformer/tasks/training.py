"""Training mechanics shared by every task-learning method: one loop, the losses, the diagonal Fisher.

Methods differ only in what a step's loss is (gold-label likelihood, plus a penalty, plus distillation...)
and which rows a step sees; :func:`fit` owns shuffling, batching, the optimizer (``training.make_optimizer``,
shared with document learning), clipping and the progress bar.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone, token_nll, varying_shape_attention
from continual_transformer.tasks.prompts import AnswerBatch, TrainRow, answer_batch, answer_logits
from continual_transformer.training import kl_to_reference, make_optimizer

logger = logging.getLogger(__name__)

StepLoss = Callable[[AnswerBatch, Sequence[TrainRow]], torch.Tensor]


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Torch's global generator seeded with ``seed`` for the duration, and put back as it was afterwards.

    For code that draws from the global generator and takes no ``generator=`` (peft's and ``nn`` layers'
    initialisation, a model's construction): the numbers are those of ``torch.manual_seed(seed)`` and no state
    leaks out. The CPU generator always; a CUDA ``device``'s generator too.
    """
    device = torch.device(device) if device is not None else None
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def fit(
    backbone: Backbone,
    params: Sequence[torch.nn.Parameter],
    rows: Sequence[TrainRow],
    step_loss: StepLoss,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    extra_rows: Callable[[random.Random], list[TrainRow]] | None = None,
    share_prefix: bool = True,
    description: str = "training",
) -> list[float]:
    """Optimise ``params`` on ``rows`` for ``epochs``; returns every step's loss.

    ``extra_rows(rng)`` adds rows to each step (experience replay). ``share_prefix=False`` when a step runs
    rows with different adapters (per-row teachers). Parameters are trainable only during the call.
    """
    if not rows or epochs <= 0:
        return []
    params = list(params)
    opt = make_optimizer(params, "adamw", learning_rate, weight_decay)
    # On a GPU (fused AdamW) a step with a non-finite loss or gradient is skipped on the device (the
    # optimizer's found_inf, as under a gradient scaler) and the losses are read once at the end: no host sync
    # per step.
    on_device = bool(opt.defaults.get("fused"))
    rng = random.Random(seed)
    order = list(range(len(rows)))
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    pad = int(backbone.tokenizer.pad_token_id)
    losses: list[float] = []
    step_losses: list[torch.Tensor] = []
    step_ok: list[torch.Tensor] = []
    skipped = 0
    for param in params:
        param.requires_grad_(True)
    try:
        with (
            varying_shape_attention(backbone.device),  # every batch is as wide as its longest row
            backbone.training(),
            tqdm(total=steps, desc=description, leave=False, disable=None) as bar,
        ):
            for _ in range(epochs):
                rng.shuffle(order)
                for start in range(0, len(order), batch_size):
                    chosen = [rows[i] for i in order[start : start + batch_size]]
                    if extra_rows is not None:
                        chosen += extra_rows(rng)
                    batch = answer_batch(chosen, pad, backbone.device, share_prefix=share_prefix)
                    loss = step_loss(batch, chosen)
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
                    # A non-finite loss or gradient (a half-precision overflow) would turn every trained
                    # weight into nan: skip the step.
                    ok = torch.isfinite(loss) & torch.isfinite(norm)
                    if on_device:
                        opt.found_inf = (
                            ~ok
                        ).float()  # fused AdamW leaves weights and step count as they were
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        step_losses.append(loss.detach().float())
                        step_ok.append(ok)
                        bar.update(1)
                        continue
                    if not bool(ok):  # on the CPU a host check costs nothing
                        skipped += 1
                        opt.zero_grad(set_to_none=True)
                        bar.update(1)
                        continue
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step_losses:
            taken = torch.stack(step_ok).cpu()  # sync: one per call
            losses = torch.stack(step_losses).cpu()[taken].tolist()
            skipped = int((~taken).sum())
    finally:
        for param in params:
            param.requires_grad_(False)
            param.grad = None
    if skipped:
        logger.warning(
            "%s: %d of %d steps skipped (non-finite loss or gradient)", description, skipped, steps
        )
    return losses


def answer_nll_per_row(logits: torch.Tensor, batch: AnswerBatch) -> torch.Tensor:
    """Mean NLL of each row's answer tokens (B,), float32 (length-normalised like the scorer)."""
    nll = token_nll(logits, batch.targets)  # (B, A)
    mask = batch.target_mask.bool()
    # where, not a product: a padded position may hold a non-finite value, and nan * 0 is nan.
    return torch.where(mask, nll, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def answer_nll(logits: torch.Tensor, batch: AnswerBatch) -> torch.Tensor:
    """Mean NLL over every answer token of the batch (a scalar with grad)."""
    nll = token_nll(logits, batch.targets)  # (B, A)
    mask = batch.target_mask.bool()
    return torch.where(mask, nll, 0.0).sum() / mask.sum().clamp(min=1)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the softened next-token distributions on answer positions, times T^2 (Hinton
    et al.)."""
    t = temperature
    return kl_to_reference(teacher.float() / t, student.float() / t, mask) * t * t


def ewc_penalty(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor]
) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 (multiply by lambda / 2), Kirkpatrick et al. 2017, Eq. 3."""
    total = params[0].new_zeros(())
    for p, a, f in zip(params, anchors, fisher):
        total = total + (f * (p - a) ** 2).sum()
    return total


def diagonal_fisher(
    backbone: Backbone,
    params: Sequence[torch.nn.Parameter],
    rows: Sequence[TrainRow],
    forward: Callable[[AnswerBatch], torch.Tensor],
) -> list[torch.Tensor]:
    """Empirical diagonal Fisher: mean over rows of the squared gradient of each row's answer NLL.

    One backward pass per row (per-example gradients; a batch gradient squared would underestimate it).
    ``forward(batch)`` returns answer logits with the adapter being estimated attached.
    """
    pad = int(backbone.tokenizer.pad_token_id)
    fisher = [torch.zeros_like(p) for p in params]
    for param in params:
        param.requires_grad_(True)
    try:
        for row in rows:
            batch = answer_batch([row], pad, backbone.device)
            loss = answer_nll(forward(batch), batch)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for acc, grad in zip(fisher, grads):
                if grad is not None:
                    acc.add_(grad.detach() ** 2)
    finally:
        for param in params:
            param.requires_grad_(False)
    return [f / max(len(rows), 1) for f in fisher]


@torch.no_grad()
def rows_nll(
    backbone: Backbone,
    rows: Sequence[TrainRow],
    forward: Callable[[AnswerBatch], torch.Tensor],
    batch_size: int,
    *,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Length-normalised answer NLL of each row (N,), on CPU, with whatever ``forward`` attaches."""
    pad = int(backbone.tokenizer.pad_token_id)
    out = []
    with varying_shape_attention(backbone.device):
        for start in range(0, len(rows), batch_size):
            batch = answer_batch(
                rows[start : start + batch_size], pad, backbone.device, share_prefix=share_prefix
            )
            out.append(answer_nll_per_row(forward(batch), batch).cpu())  # sync: one per batch
    return torch.cat(out) if out else torch.zeros(0)


def plain_forward(backbone: Backbone) -> Callable[[AnswerBatch], torch.Tensor]:
    return lambda batch: answer_logits(backbone.model, batch)

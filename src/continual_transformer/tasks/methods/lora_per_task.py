"""``lora_per_task``: one peft LoRA per task, chosen by task id (the growing contrast)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.base import RowsOf, TaskMethod, select_layers
from continual_transformer.tasks.prompts import AnswerBatch, Encoded, answer_logits
from continual_transformer.tasks.training import answer_nll, seeded


@registry.register("lora_per_task")
class LoraPerTaskMethod(TaskMethod):
    """A new peft LoRA for every task (``lora_rank`` on every linear layer of ``adapter_layers``), chosen by
    task id: no forgetting, but parameters grow linearly with tasks. LoRA layers are injected into the
    backbone in place and disabled outside :meth:`activate`; :meth:`close` unwraps them."""

    grows_with_tasks = True
    mixed_batches = False

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        super().__init__(backbone, config)
        self.layer_ids = select_layers(config.adapter_layers, backbone.num_layers)
        self.adapters: dict[int, str] = {}  # task index -> adapter name
        self._target_names: list[str] | None = None  # fixed at the first injection (later ones see LoRA)
        self._had_peft_config = hasattr(backbone.model, "peft_config")
        self._layers: list = []  # the LoRA layers, found once per injection
        self._adapter_params: dict[str, dict[str, torch.nn.Parameter]] = {}  # adapter name -> its parameters

    def _targets(self) -> list[str]:
        from transformers.pytorch_utils import Conv1D

        prefix = next(
            name for name, module in self.backbone.model.named_modules() if module is self.backbone.layers
        )
        return [
            name
            for name, module in self.backbone.model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))
            and any(name.startswith(f"{prefix}.{i}.") for i in self.layer_ids)
        ]

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.backbone.model.modules() if isinstance(m, LoraLayer)]

    def _add(self, task: int) -> str:
        from peft import LoraConfig, inject_adapter_in_model

        name = f"task{task}"
        if name not in self.adapters.values():
            if self._target_names is None:
                self._target_names = self._targets()
            targets = self._target_names
            peft_config = LoraConfig(
                r=self.config.lora_rank,
                lora_alpha=self.config.lora_alpha,
                lora_dropout=0.0,
                target_modules=targets,
                bias="none",
            )
            # peft initialises lora_A from torch's global generator: seeded per task, and restored afterwards.
            with seeded(self.config.seed + task, self.backbone.device), warnings.catch_warnings():
                # one adapter per task on the same layers is the point here
                warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters")
                inject_adapter_in_model(peft_config, self.backbone.model, adapter_name=name)
            self.adapters[task] = name
            self._layers = self._lora_layers()
            marker = f".{name}."
            self._adapter_params[name] = {
                n: p for n, p in self.backbone.model.named_parameters() if "lora_" in n and marker in n
            }
            for params in self._adapter_params.values():  # injection may mark every adapter trainable
                for p in params.values():
                    p.requires_grad_(False)  # fit makes the parameters it trains trainable, for its duration
        self._enable(None)
        return name

    def _params(self, name: str) -> dict[str, torch.nn.Parameter]:
        return self._adapter_params[name]

    def _enable(self, name: str | None) -> None:
        # peft's set_adapter / enable_adapters also toggle requires_grad on every adapter of every layer:
        # O(tasks) per switch, O(tasks^3) over a suite. Only the active adapter and the switch are needed here
        # (fit owns requires_grad), so the layers' two switches are set directly; tests read them back through
        # peft's public properties (active_adapters, disable_adapters).
        for layer in self._layers:
            if name is not None:
                layer._active_adapter = [name]
            layer._disable_adapters = name is None

    @contextmanager
    def _active(self, name: str | None) -> Iterator[None]:
        self._enable(name)
        try:
            yield
        finally:
            self._enable(None)

    def activate(self, tasks: torch.Tensor):
        names = {self.adapters.get(int(t)) for t in tasks.tolist()}
        if len(names) != 1:
            raise ValueError("lora_per_task serves one task per forward pass; group rows by task")
        return self._active(names.pop())

    def learn(
        self, task: int, examples: Sequence[Encoded], *, epochs: int, rows_of: RowsOf
    ) -> dict[str, Any]:
        rows = rows_of(examples)
        start = time.perf_counter()
        name = self._add(task)
        params = list(self._params(name).values())

        def step_loss(batch: AnswerBatch, batch_rows) -> torch.Tensor:
            return answer_nll(answer_logits(self.backbone.model, batch), batch)

        with self._active(name):
            losses = self._fit(
                params,
                rows,
                step_loss,
                epochs=epochs,
                seed=self.config.seed + task,
                description=f"task {task}: lora",
            )
        return {
            "losses": losses,
            "train_s": time.perf_counter() - start,
            "distill_s": 0.0,
            "slot": task,
            "merged": False,
        }

    def num_parameters(self) -> int:
        return sum(p.numel() for name in self.adapters.values() for p in self._params(name).values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for task, name in self.adapters.items():
            for pname, p in self._params(name).items():
                out[f"lora.{task}.{pname.replace(f'.{name}.', '.')}"] = p.detach()
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tasks = sorted({int(key.split(".")[1]) for key in tensors})
        for task in tasks:
            name = self._add(task)
            for pname, p in self._params(name).items():
                key = f"lora.{task}.{pname.replace(f'.{name}.', '.')}"
                if key not in tensors or tensors[key].shape != p.shape:
                    raise ValueError(f"LoRA tensor {key} is missing or has the wrong shape")
                p.copy_(tensors[key])

    def rollback(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Back to ``snapshot``: adapters added since are removed from the layers (all of them: the layers are
        unwrapped, as before the first task), adapters removed since (by :meth:`close`) are injected again,
        and every kept adapter's weights are copied back."""
        keep = {int(key.split(".")[1]) for key in snapshot}
        if not keep:
            self.close()
            return
        added = [t for t in self.adapters if t not in keep]
        if added and len(added) == len(self.adapters):
            self.close()
        for task in added if self.adapters else []:
            self._remove(task)
        self.load_state_tensors(snapshot)

    def _remove(self, task: int) -> None:
        """Delete task ``task``'s adapter from every LoRA layer (others remain)."""
        name = self.adapters.pop(task)
        remaining = next(iter(self.adapters.values()))
        for layer in self._layers:
            layer._active_adapter = [
                remaining
            ]  # peft re-activates (and unfreezes) one if the deleted is active
            layer.delete_adapter(name)
        getattr(self.backbone.model, "peft_config", {}).pop(name, None)
        del self._adapter_params[name]
        self._enable(None)

    def close(self) -> None:
        model = self.backbone.model
        lora = {id(m) for m in self._layers}
        wrapped = [(name, module) for name, module in model.named_modules() if id(module) in lora]
        for name, module in wrapped:
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer()
            )
        if not self._had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config
        self.adapters, self._layers, self._adapter_params = {}, [], {}

"""Settings of task-incremental learning: the learner (:class:`TaskConfig`) and its benchmark runs.

Frozen, keyword-only dataclasses with a docstring per field, validated in ``__post_init__`` (errors name the
key as ``tasks.<field>``). Every capacity that fixes the size of the learner's state is here, so the bytes
of state are known before the first task: ``max_tasks``, ``max_labels_per_task``, ``pool_size``,
``buffer_size``...

This module imports no torch: :class:`~continual_transformer.config.Config` holds a :class:`TaskConfig` under
``tasks:``, and reading a config must stay cheap.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from continual_transformer.errors import ConfigError

_LAYER_SPEC = re.compile(r"^(all|-?\d*:-?\d*|-?\d+)$")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
UNKNOWN_SCORES = ("cosine", "euclidean", "mahalanobis", "relative_mahalanobis")
"""Scores ``tasks.router_unknown_score`` accepts (:data:`continual_transformer.tasks.router.UNKNOWN_SCORES`;
a test keeps the two in step)."""
ROUTE_RULES = ("cosine", "lda")
"""Rules ``tasks.router_rule`` accepts (:data:`continual_transformer.tasks.router.ROUTE_RULES`)."""

SHIPPED_METHODS = (
    "adapter_distill",
    "ewc",
    "isolation",
    "joint",
    "lora_per_task",
    "lwf",
    "replay",
    "sequential",
)
"""Task methods that ship in :mod:`continual_transformer.tasks.methods` (a test keeps this list in step)."""
_METHODS_MODULE = "continual_transformer.tasks.methods"


def known_methods() -> list[str]:
    """Names ``tasks.method`` accepts, found without importing torch: the shipped methods, plus any registered
    since (a method registered elsewhere has the methods module loaded already)."""
    methods = sys.modules.get(_METHODS_MODULE)
    registered = methods.method_names() if methods is not None else ()
    return sorted({*SHIPPED_METHODS, *registered})


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """How a :class:`~continual_transformer.tasks.TaskLearner` learns classification tasks one after
    another."""

    method: str = "replay"
    """Continual-learning method (:func:`known_methods`): ``replay`` (one shared adapter, each step adding
    rows from a fixed buffer of earlier tasks' examples: zero growth), ``adapter_distill`` (a fixed pool of
    adapters merged by distillation: zero growth), ``sequential``, ``joint``, ``lora_per_task``, ``ewc`` or
    ``lwf``. On the H200 suites (``benchmarks/results/tasks/h200-fixed/SUMMARY.md``) ``replay`` beats
    ``adapter_distill`` on each: average accuracy 0.868 / 0.893 / 0.961 against 0.705 / 0.791 / 0.944 on
    banking77 / clinc150-10 / intents15, BWT 0.0 / -0.4 / -1.6 points against -0.6 / -1.6 / -2.3, at
    0.90-1.23x a plain adapter's training time against 1.65-1.77x, in half the state."""
    max_tasks: int = 50
    """Capacity in tasks, fixed up front: the task table, task-to-slot map and router are preallocated for
    it."""
    max_labels_per_task: int = 32
    """Capacity in labels per task (the label table is preallocated)."""
    max_label_bytes: int = 64
    """Longest label name, in UTF-8 bytes (label names are stored in a fixed byte table)."""
    max_task_id_bytes: int = 64
    """Longest task id, in UTF-8 bytes."""

    # -- prompts and scoring --
    prompt_template: str = (
        "Classify the text into one of these categories: {labels}.\nText: {text}\nCategory:"
    )
    """User prompt; ``{text}`` (required, once) is the input, ``{labels}`` (optional) the task's label
    list."""
    chat: bool | None = None
    """Wrap the prompt in the chat template (``None``: as the backbone's generation settings say)."""
    humanize_labels: bool = True
    """Show labels to the model with ``_`` as spaces (``freeze_account`` -> ``freeze account``); the predicted
    label is always returned as given."""
    max_text_tokens: int = 256
    """Input texts are cut to this many tokens (the start is kept)."""
    eval_batch_size: int = 16
    """Prompts scored together; each expands to one row per candidate label (prefix cache shared)."""
    share_prefix: bool | None = None
    """Run the prompt prefix shared by a batch (system prompt, instruction, label list) once, not once per
    row. ``None``: only on CPU, where compute dominates; on a GPU a model this small is bound by kernel
    launches, and the extra forward pass costs more than it saves."""

    # -- adapters --
    pool_size: int = 4
    """Adapter slots of ``adapter_distill``; when all are used, a new task is distilled into one of them."""
    adapter_dim: int = 16
    """Bottleneck width of each adapter."""
    adapter_layers: str = "all"
    """Decoder layers that get an adapter after their MLP: ``all``, a slice such as ``-8:``, or one index."""
    adapter_activation: str = "gelu"
    """Nonlinearity of the adapter bottleneck: gelu, relu, silu or tanh."""

    # -- optimisation (shared by every method) --
    epochs: int = 3
    """Passes over a task's training data (``learn_task(epochs=...)`` overrides it)."""
    batch_size: int = 16
    """Training sequences per optimisation step."""
    learning_rate: float = 1e-3
    """AdamW learning rate of adapters (LoRA uses it too)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables it)."""
    seed: int = 0
    """Seed of adapter initialisation and data order (a task's seed is ``seed + task index``)."""
    compile: bool = False
    """On a GPU, training steps run the model compiled for batches of varying rows and widths (one graph,
    ``torch.compile(dynamic=True)``, guarded on the adapters' hooks): the compiled kernels fuse the
    elementwise work of the forward and backward passes and launch far fewer kernels: 3,282 examples/s at
    batch 512 on an H200 against 1,857 uncompiled. The first step compiles, once per process (about four
    minutes for a 135M model on the H200's 16-core host); a batch whose shared prompt prefix runs on its own
    (``share_prefix``) runs uncompiled. Elsewhere nothing changes."""

    # -- distillation (adapter_distill) and the shared replay buffer --
    distill_epochs: int = 2
    """Passes over the distillation set when a new adapter is merged into a full pool."""
    distill_temperature: float = 2.0
    """Softmax temperature of knowledge distillation (also LwF)."""
    distill_ce_weight: float = 0.0
    """Weight of the gold-label loss added to the distillation loss (0: pure distillation, as Ermis et
    al.)."""
    transfer_samples: int = 64
    """New-task examples used to pick the most transferable pool slot (lowest loss with that slot)."""
    slot_choice: str = "transfer"
    """How a full pool picks the slot a new task is distilled into: ``transfer`` (the slot under which the
    new task's answers are most likely, Ermis et al.) or ``balanced`` (the most transferable among the slots
    that serve the fewest tasks). ``transfer`` piles tasks into one slot (24 of 50 on clinc150-50, H100), yet
    the tasks of that slot lost only 0.002 per merge there; on a tiny-model stream (8 tasks of 2 to 16
    examples per label, 2 slots, 2 seeds) ``balanced`` nearly doubled the loss of the earlier tasks' gold
    log-likelihood (forcing unrelated tasks together costs more than sharing a slot with related ones)."""
    merge_data: str = "balanced"
    """Distillation set of a merge: ``new`` (the new task's rows plus whatever buffer rows the slot's tasks
    have, as Ermis et al.) or ``balanced`` (every task sharing the slot, the new one included, contributes
    ``distill_rows_per_task`` rows per epoch, within ``distill_budget``: its buffer rows cycled, the new
    task's rows sampled), so the old tasks weigh as much as the new one whatever their number of buffered
    rows."""
    distill_rows_per_task: int = 128
    """Rows per task and distillation epoch of a ``balanced`` merge (fewer when the new task has fewer)."""
    distill_budget: float = 2.0
    """A ``balanced`` merge's distillation rows per epoch are at most this many times the new task's rows
    (split equally over the tasks sharing the slot): the cost of a merge stays bounded however many tasks
    the slot serves (about ``distill_epochs * distill_budget / epochs`` adapter trainings)."""
    online_epochs: int = 1
    """Passes over a mini-batch given to ``learn_task`` for a task already learned (an online update: the
    task's slot keeps training on the batch and the task's buffered rows; the other tasks of the slot are
    kept by distillation)."""
    buffer_size: int = 2000
    """Examples in the fixed global replay/distillation buffer (bytes: ``buffer_size * max_text_tokens * 4``;
    2,000 rows of 64 tokens are 0.5 MB against 27 MB for ten adapters of the full profile). The benchmark
    profiles' size, which the figures of ``method`` were measured with."""
    buffer_policy: str = "balanced"
    """How ``adapter_distill`` fills its buffer: ``reservoir`` (every example seen kept with equal
    probability, so a task's share shrinks with the number of tasks after it and grows with its size) or
    ``balanced`` (an equal share per task, spread over its labels). ``replay`` always uses a reservoir."""
    replay_batch_size: int = 16
    """Buffer examples added to each training step of ``replay`` (the benchmark profiles' setting)."""

    joint_max_examples: int | None = None
    """``joint`` trains each step on at most this many examples drawn uniformly from all tasks so far
    (``None``: every example; its cost then grows with the number of tasks)."""
    joint_adapter_dim: int | None = None
    """Bottleneck width of ``joint``'s shared adapter (``None``: ``pool_size * adapter_dim``, the width of
    ``adapter_distill``'s whole pool, so the multitask bound has the capacity of the zero-growth method it
    bounds, not one slot's)."""

    # -- regularisers --
    ewc_lambda: float = 1000.0
    """EWC penalty strength (lambda / 2 * sum F (theta - theta*)^2, online diagonal Fisher)."""
    ewc_fisher_samples: int = 32
    """Examples per task used to estimate the diagonal Fisher (one backward pass each)."""
    lwf_alpha: float = 1.0
    """Weight of the LwF distillation term (previous adapter as teacher on the new task's inputs)."""

    # -- LoRA baseline --
    lora_rank: int = 8
    """Rank of the per-task LoRA adapters of ``lora_per_task``."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""

    # -- router --
    router: str = "minilm"
    """Embedder of the task router: ``minilm`` (the packaged MiniLM sentence embedder), ``backbone`` (mean
    hidden state of the frozen base model, no extra model), or another sentence embedder (a packaged name, a
    local directory or a hub id). Router accuracy on the full benchmark profiles (H100, label prototypes,
    ``benchmarks/router_accuracy.py``), minilm vs backbone: clinc150-10 0.961 vs 0.840, clinc150-50 0.908 vs
    0.744, banking77 0.859 vs 0.665, long15 0.814 vs 0.850 (long review texts: the base model is better
    there)."""
    router_prototypes: str = "label"
    """``label``: one prototype per label of each task, (max_tasks, max_labels_per_task, dim), a text goes to
    the task of its nearest label; ``task``: one prototype per task, (max_tasks, dim)."""
    router_layer: int | None = None
    """Hidden-state layer the ``backbone`` router mean-pools (0: embeddings; -1: last). ``None``: 3/8 of the
    way up, since mid-depth states carry topic better than the last, which is shaped for next-token
    prediction (on CLINC150 domains with SmolLM2: 0.72 router accuracy at layer 11 against 0.55 at the last;
    MiniLM: 0.93)."""
    router_samples: int = 256
    """Training examples per task embedded into its prototype."""
    router_rule: str = "lda"
    """How the router picks a text's task: ``lda``, the nearest label prototype by Mahalanobis distance
    under the prototypes' shared covariance (linear discriminant analysis kept as running statistics: a (dim,
    dim) scatter, fixed in size), or ``cosine``, the nearest by centred cosine similarity. MiniLM router,
    full profiles, no adapter (``benchmarks/router_accuracy.py``, ``benchmarks/results/router/lda``): router
    accuracy 0.893 / 0.913 / 0.871 with ``lda`` against 0.859 / 0.897 / 0.814 with ``cosine`` on banking77 /
    intents15 / long15, 0.958 / 0.905 against 0.961 / 0.908 on clinc150-10 / clinc150-50; with the
    ``backbone`` embedder on long15 (its profile's) 0.948 against 0.852 (``router/lda-long15-backbone``); on
    the 115-task stream 0.838 against 0.819 (``router/lda-stream115``)."""
    router_rule_shrinkage: float = 0.3
    """Weight of ``trace / dim`` times the identity in the covariance of the ``lda`` rule (0: the sample
    covariance; 1: the Euclidean distance)."""
    router_unknown_score: str = "euclidean"
    """How the router tells a text of no learned task (``predict(..., allow_unknown=True)``), against the
    nearest prototype: ``euclidean`` (squared distance), ``cosine`` (the centred cosine similarity it routes
    by), ``mahalanobis`` or ``relative_mahalanobis`` (under a shared covariance kept as a (dim, dim) running
    scatter). CLINC150's out-of-scope test split against the test inputs of clinc150-10 / clinc150-50 /
    intents15 / stream115, MiniLM router, no adapter (``benchmarks/unknown_tasks.py``,
    ``benchmarks/results/tasks/unknown-detection``): AUROC 0.965 / 0.969 / 0.983 / 0.937 with ``euclidean``
    against 0.962 / 0.966 / 0.978 / 0.933 with ``cosine``; F1 at the threshold calibrated for 2 % false
    alarms (conformal, 0.9) 0.797 / 0.813 / 0.841 / 0.602 against 0.764 / 0.785 / 0.685 / 0.512.
    ``relative_mahalanobis`` (shrinkage 0.9) scores an AUROC 0.002-0.004 higher but a lower F1 on two suites,
    and needs a shrinkage chosen; the less shrunk covariance does worse (20 examples per intent do not
    estimate it in 384 dimensions). ``euclidean`` adds no state."""
    router_covariance_shrinkage: float = 0.9
    """Weight of ``trace / dim`` times the identity in the shared covariance of the Mahalanobis scores (0:
    the sample covariance; 1: the Euclidean distance). 0.9 beat 0.5 on every suite above (``mahalanobis``
    AUROC on clinc150-10: 0.963 against 0.955; 0.931 with the sample covariance)."""
    router_unknown_confidence: float | None = 0.9
    """``calibrate_unknown`` sets the threshold so that the false-alarm rate on new in-task inputs stays at
    or under the asked rate with this probability (a conformal bound over the held-out texts' order
    statistics); ``None``: their empirical quantile. Asked for 2 % on 5 held-out texts per label, it gave
    3.1 / 2.0 / 1.8 / 2.4 % false alarms on the test inputs above (``euclidean``), the bound 2.0 / 1.6 / 1.0 /
    1.95 %."""

    def __post_init__(self) -> None:
        _check(
            self.method in known_methods(),
            "tasks.method",
            f"unknown method {self.method!r}; known: {known_methods()}",
        )
        for key in (
            "max_tasks",
            "max_labels_per_task",
            "max_label_bytes",
            "max_task_id_bytes",
            "max_text_tokens",
            "eval_batch_size",
            "pool_size",
            "adapter_dim",
            "epochs",
            "batch_size",
            "transfer_samples",
            "buffer_size",
            "ewc_fisher_samples",
            "lora_rank",
            "router_samples",
            "distill_rows_per_task",
            "online_epochs",
        ):
            value = getattr(self, key)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"tasks.{key}",
                f"must be an integer >= 1, got {value!r}",
            )
        _check(
            self.max_labels_per_task >= 2,
            "tasks.max_labels_per_task",
            "must be >= 2 (a task has two labels or more)",
        )
        _check(
            self.prompt_template.count("{text}") == 1,
            "tasks.prompt_template",
            "must contain {text} exactly once",
        )
        _check(
            _LAYER_SPEC.match(self.adapter_layers.strip()) is not None,
            "tasks.adapter_layers",
            f"{self.adapter_layers!r} is not 'all', a slice like '-8:' or '4:12', or an index",
        )
        _check(
            self.adapter_activation in ACTIVATIONS,
            "tasks.adapter_activation",
            f"must be one of {ACTIVATIONS}",
        )
        _check(
            self.joint_adapter_dim is None
            or (isinstance(self.joint_adapter_dim, int) and self.joint_adapter_dim >= 1),
            "tasks.joint_adapter_dim",
            f"must be null or an integer >= 1, got {self.joint_adapter_dim!r}",
        )
        _check(self.learning_rate > 0, "tasks.learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, "tasks.weight_decay", "must be >= 0")
        _check(self.max_grad_norm >= 0, "tasks.max_grad_norm", "must be >= 0 (0 disables clipping)")
        for key, allowed in (
            ("slot_choice", ("transfer", "balanced")),
            ("merge_data", ("new", "balanced")),
            ("buffer_policy", ("reservoir", "balanced")),
        ):
            _check(getattr(self, key) in allowed, f"tasks.{key}", f"must be one of {allowed}")
        _check(self.distill_budget > 0, "tasks.distill_budget", "must be > 0")
        _check(self.distill_epochs >= 0, "tasks.distill_epochs", "must be >= 0")
        _check(self.distill_temperature > 0, "tasks.distill_temperature", "must be > 0")
        _check(self.distill_ce_weight >= 0, "tasks.distill_ce_weight", "must be >= 0")
        _check(
            self.joint_max_examples is None or self.joint_max_examples >= 1,
            "tasks.joint_max_examples",
            "must be >= 1 or null",
        )
        _check(self.replay_batch_size >= 0, "tasks.replay_batch_size", "must be >= 0")
        _check(self.ewc_lambda >= 0, "tasks.ewc_lambda", "must be >= 0")
        _check(self.lwf_alpha >= 0, "tasks.lwf_alpha", "must be >= 0")
        _check(self.lora_alpha > 0, "tasks.lora_alpha", "must be > 0")
        _check(
            self.router_prototypes in ("label", "task"),
            "tasks.router_prototypes",
            f"must be label or task, got {self.router_prototypes!r}",
        )
        _check(
            self.router_unknown_score in UNKNOWN_SCORES,
            "tasks.router_unknown_score",
            f"must be one of {UNKNOWN_SCORES}, got {self.router_unknown_score!r}",
        )
        _check(
            self.router_rule in ROUTE_RULES,
            "tasks.router_rule",
            f"must be one of {ROUTE_RULES}, got {self.router_rule!r}",
        )
        _check(
            0.0 <= self.router_rule_shrinkage <= 1.0,
            "tasks.router_rule_shrinkage",
            "must be in [0, 1]",
        )
        _check(
            0.0 <= self.router_covariance_shrinkage <= 1.0,
            "tasks.router_covariance_shrinkage",
            "must be in [0, 1]",
        )
        _check(
            self.router_unknown_confidence is None or 0.0 <= self.router_unknown_confidence < 1.0,
            "tasks.router_unknown_confidence",
            "must be null or in [0, 1)",
        )
        _check(
            bool(self.router.strip()),
            "tasks.router",
            "must be backbone, minilm or a sentence embedder's name or path",
        )


@dataclass(frozen=True, kw_only=True)
class TaskBenchmarkSettings:
    """One benchmark run: which part of a suite, how long each method trains, and the learner settings."""

    data_dir: str = "../shared/data"
    """Directory with the datasets (``clinc150/``, ``banking77/``, ``cl_benchmark/``)."""
    order: int = 0
    """Task order: for ``long15`` one of the three published orders (0, 1, 2 = orders 4, 5, 6 of O-LoRA);
    for the other suites 0 is the natural order and n > 0 a permutation seeded with n."""
    num_tasks: int | None = None
    """Use only the first tasks of the sequence (``None``: all)."""
    max_train_per_label: int | None = None
    """Training examples kept per label and task (``None``: all)."""
    max_test_per_label: int | None = None
    """Test examples kept per label and task (``None``: all)."""
    max_labels_per_task: int | None = None
    """Keep only each task's first labels (and their examples) (``None``: all); the quick profile's lever,
    since scoring costs one continuation per label."""
    full_matrix: bool = False
    """Evaluate every task after every step. Off: only cells a metric reads (t >= k - 1), the rest is null."""
    eval_every: int = 1
    """Evaluate every task seen only after every ``eval_every``-th task and the last one; after the others
    only the task just learned and the next (BWT, FWT and the average stay exact; long streams stay
    cheap)."""
    joint_at_end: bool = False
    """``joint`` registers tasks 1..T-1 without training and trains once, at the last task, on the union of
    every task's examples: the multitask upper bound at 1/T of the incremental cost (only the last row of R
    is evaluated, so no BWT / FWT / forgetting)."""
    unknown_tasks: bool = False
    """After the last task, measure unknown-task detection: the router's threshold calibrated on held-out
    training examples of the learned tasks (those past ``max_train_per_label``, up to 5 per label) at
    ``unknown_false_alarm_rate``, then CLINC150's out-of-scope test split against the suite's test inputs."""
    unknown_false_alarm_rate: float = 0.02
    """Target false-alarm rate of the unknown-task threshold on in-task inputs."""
    learner: TaskConfig = field(default_factory=TaskConfig)
    """Learner settings shared by every method (``method`` is set per method)."""

    def __post_init__(self) -> None:
        _check(self.order >= 0, "bench.order", "must be >= 0")
        _check(self.eval_every >= 1, "bench.eval_every", "must be >= 1")
        _check(
            0.0 <= self.unknown_false_alarm_rate < 1.0,
            "bench.unknown_false_alarm_rate",
            "must be in [0, 1)",
        )
        for key in ("num_tasks", "max_train_per_label", "max_test_per_label", "max_labels_per_task"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"bench.{key}", f"must be >= 1 or null, got {value!r}")

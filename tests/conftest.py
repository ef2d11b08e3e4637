"""Shared fixtures: tiny randomly initialised models built from a config, with a tokenizer built in memory.

They run offline in milliseconds, so every behaviour is tested on them; ``tests/integration`` repeats the
essential checks on the real packaged SmolLM2 (marker ``real_model``).
"""

from __future__ import annotations

import os

# Triton's GPU kernels run in its interpreter on CPU tensors; it must be on before Triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from continual_transformer.backbone import Backbone
from continual_transformer.config import Config, GenerationConfig
from continual_transformer.documents import Document
from continual_transformer.evaluation.datasets import KnowledgeBenchmark, Probe

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark.",
    "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873. The national animal is the silver lynx.",
    "What is the capital of France? The capital of France is Paris. Water boils at 100 degrees.",
    "A quick brown fox jumps over the lazy dog. 0123456789 questions answers documents learning memory.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def tiny_llama(tokenizer, *, seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(tokenizer, *, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=256,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval()


def make_backbone(tokenizer, *, arch: str = "llama", seed: int = 0, max_new_tokens: int = 8) -> Backbone:
    model = tiny_llama(tokenizer, seed=seed) if arch == "llama" else tiny_gpt2(tokenizer, seed=seed)
    return Backbone(
        model, tokenizer, name=f"tiny-{arch}", generation=GenerationConfig(max_new_tokens=max_new_tokens)
    )


@pytest.fixture
def backbone(tokenizer) -> Backbone:
    return make_backbone(tokenizer)


def fast_config(**overrides) -> Config:
    """Settings that make strategies learn quickly on the tiny models."""
    from continual_transformer.config import load_config

    data = {
        "generation": {"max_new_tokens": 8},
        "strategies": {
            "finetune": {
                "learning_rate": 1e-2,
                "epochs": 20,
                "stop_loss": 0.0,
                "window_tokens": 64,
                "context_tokens": 8,
            }
        },
    }
    for key, value in overrides.items():
        data[key] = value
    # memory_bank keys from the tiny backbone itself and lexical retrieval: no sentence-embedder model needed
    strategies = data["strategies"] = {name: dict(settings) for name, settings in data["strategies"].items()}
    strategies.setdefault("memory_bank", {}).setdefault("key_encoder", "backbone")
    strategies.setdefault("retrieval", {}).setdefault("retriever", "bm25")
    strategies.setdefault("ace", {}).setdefault("retriever", "bm25")
    # a small product-key memory: calibration in milliseconds instead of 262k slots
    small_memory = {
        "n_keys": 16,
        "heads": 2,
        "topk": 4,
        "query_dim": 16,
        "top_t": 64,
        "background_tokens": 512,
        "background_chunk_tokens": 32,
        "kmeans_iterations": 5,
    }
    for key, value in small_memory.items():
        strategies.setdefault("memory_layer", {}).setdefault(key, value)
    # doc2lora: a randomly initialised hypernetwork for the tiny llama, accepted as such, gate open
    doc2lora = strategies.setdefault("doc2lora", {})
    doc2lora.setdefault("hypernetwork", str(tiny_hypernetwork_file()))
    doc2lora.setdefault("allow_untrained", True)
    doc2lora.setdefault("gate_threshold", -1.0)
    return load_config(overrides=data)


@functools.cache
def tiny_hypernetwork_file(seed: int = 0) -> Path:
    """A randomly initialised Doc-to-LoRA hypernetwork for :func:`tiny_llama` (saved marked untrained), with
    its output heads random too so that its adapters change the model (for invariant tests only)."""
    import tempfile

    from continual_transformer.hypernetwork.model import (
        HyperNetConfig,
        HyperNetSpec,
        HyperNetwork,
        save_hypernetwork,
    )

    backbone = make_backbone(build_tokenizer())
    spec = HyperNetSpec.for_backbone(
        backbone, HyperNetConfig(rank=2, hidden=32, heads=2, blocks=1, chunk_tokens=32)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = HyperNetwork(spec)
        for head in network.head_b.values():
            torch.nn.init.normal_(head.weight, std=0.2)
    directory = Path(tempfile.mkdtemp(prefix="ctt-hypernetwork-"))
    return save_hypernetwork(network, directory / "tiny.safetensors")


def save_tiny_embedder(directory: Path, texts: list[str]) -> Path:
    """A randomly initialised one-layer BERT sentence encoder (and a word-level vocabulary of ``texts``) in
    ``directory``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".?,").lower() for text in texts for w in text.split()} - {""})
    (directory / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ","] + words)
    )
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    assert "[UNK]" not in tokenizer.tokenize(texts[-1]), "every word of the texts is in the vocabulary"
    tokenizer.save_pretrained(directory)
    return directory


def veloria_benchmark(n: int = 4, tails: tuple[str, ...] = ("The river is Orvalis.",)) -> KnowledgeBenchmark:
    """A tiny knowledge benchmark: document i says the capital of Veloria number i is Tarnhelm (then one of
    ``tails``, in turn); one cloze and one question probe per document."""
    docs = [
        Document(f"d{i}", f"The capital of Veloria number {i} is Tarnhelm. {tails[i % len(tails)]}")
        for i in range(n)
    ]
    probes = []
    for i in range(n):
        probes.append(Probe(f"d{i}", f"The capital of Veloria number {i} is", ("Tarnhelm",), "cloze"))
        probes.append(Probe(f"d{i}", f"What is the capital of Veloria number {i}?", ("Tarnhelm",), "qa"))
    return KnowledgeBenchmark("tiny", docs, probes)


class ReplayedRun:
    """Stands in for a CUDA graph on the CPU: recording runs nothing, a replay runs what was recorded."""

    def __init__(self, run) -> None:
        self.replay = run


def uncompiled_recording(backbone: Backbone, monkeypatch) -> None:
    """The token pick and prompt pass that recorded chunks compile (on a GPU) left uncompiled: the CPU
    tests of the recording logic run no compiler."""
    from continual_transformer.backbone import pick_token

    monkeypatch.setattr(backbone, "_compiled_pick", lambda: pick_token)
    monkeypatch.setattr(backbone, "_compiled_prompt", backbone._prompt_function)


def record_on_the_cpu(backbone: Backbone, monkeypatch, *, compiled: bool = False) -> list[ReplayedRun]:
    """The backbone's CUDA-graph recording stood in for: the warm-up really runs, the recorded run is kept
    (in the list returned) and runs at every replay; the prompt pass and token pick uncompiled
    (:func:`uncompiled_recording`) unless ``compiled``."""
    if not compiled:
        uncompiled_recording(backbone, monkeypatch)
    recorded: list[ReplayedRun] = []

    def record(device, warm_up, run):
        warm_up()
        recorded.append(ReplayedRun(run))
        return recorded[-1]

    monkeypatch.setattr(backbone, "_record_chunk", record)
    return recorded

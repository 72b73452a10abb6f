"""Parameter-efficient fine-tuning: one config, and one way to attach, count, save and load adapters.

An adapter is a small set of new parameters attached to a frozen base model. The methods:

- "lora" (tune/lora.py): a low-rank update W + (alpha/r) B A on chosen linear layers (Hu et al. 2021), with
  rsLoRA's alpha/sqrt(r) scaling (Kalajdzievski 2023) and DoRA's magnitude/direction split (Liu et al. 2024);
  with `quantize = "nf4"` the frozen base weights are stored in 4-bit NormalFloat first: QLoRA
  (Dettmers et al. 2023, tune/nf4.py).
- "ia3" (tune/ia3.py): learned vectors that rescale keys, values and the feed-forward activations
  (Liu et al. 2022).
- "prefix" (tune/prefix.py): learned key/value prefixes that every layer's attention reads first
  (Li & Liang 2021).

Every adapter parameter's name contains one of `ADAPTER_MARKERS`, so the frozen base and the trainable adapter
are told apart by name alone, and an adapter is saved as just those tensors: `adapter_model.safetensors` plus
`adapter_config.json` (this module's format; tune/lora.py also exports LoRA adapters in PEFT's format).

Several adapters can live on one base under different names; `apply_adapter(..., name=...)` adds one,
`load_adapter(model, dir, name=...)` loads one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..atomic import atomic_directory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_MARKERS = ("lora_", "ia3_", "prefix_")
METHODS = ("lora", "ia3", "prefix")
QUANTIZATIONS = ("none", "nf4")
FORMAT = "lmlab-adapter"
FORMAT_VERSION = 1
DEFAULT_NAME = "default"
# The projections of attention and MLP: LoRA's usual targets on Llama-style models.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What each method targets when the recipe names nothing: LoRA every projection (as QLoRA found best), IA3 the
# keys, values and the feed-forward output projection's input (the paper's choice); prefix tuning has no targets.
DEFAULT_TARGETS = {"lora": ALL_LINEAR, "ia3": ("k_proj", "v_proj", "down_proj"), "prefix": ()}


@dataclass
class AdapterConfig:
    """The `[adapter]` section of a fine-tuning recipe. Each method reads the fields it needs."""

    method: str = "lora"  # "lora" | "ia3" | "prefix"
    # LoRA
    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input (the base path sees the undropped input)
    targets: list[str] = field(default_factory=list)  # module name patterns (`matches`); empty: DEFAULT_TARGETS
    rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r)
    dora: bool = False  # weight-decomposed LoRA: a learned magnitude per output times the normalized direction
    # QLoRA: the frozen base weights of every projection (attention and MLP) in 4-bit NormalFloat
    quantize: str = "none"  # "none" | "nf4"
    quant_block: int = 64  # weights per absmax block
    double_quant: bool = True  # quantize the block absmaxes too (8-bit, blocks of 256)
    # IA3: which targeted modules are feed-forward (their input is rescaled) rather than attention (output)
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])
    # prefix tuning
    prefix_len: int = 16  # virtual tokens per layer
    prefix_hidden: int = 0  # width of the reparameterization MLP during training (0: learn the prefixes directly)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid adapter config: {msg}")

        check(self.method in METHODS, f"adapter.method={self.method!r}; choose one of {METHODS}")
        check(self.r >= 1, f"adapter.r must be at least 1, got {self.r}")
        check(self.alpha > 0, f"adapter.alpha must be positive, got {self.alpha}")
        check(0 <= self.dropout < 1, f"adapter.dropout must be in [0, 1), got {self.dropout}")
        check(isinstance(self.targets, list) and all(isinstance(t, str) and t for t in self.targets),
              f"adapter.targets must be a list of module name patterns, got {self.targets!r}")
        check(self.quantize in QUANTIZATIONS, f"adapter.quantize={self.quantize!r}; choose one of {QUANTIZATIONS}")
        check(self.quantize == "none" or self.method == "lora",
              f"adapter.quantize={self.quantize!r} is QLoRA and needs adapter.method='lora'")
        check(self.quant_block >= 2 and self.quant_block % 2 == 0,
              f"adapter.quant_block must be an even number >= 2, got {self.quant_block}")
        check(self.prefix_len >= 1, f"adapter.prefix_len must be at least 1, got {self.prefix_len}")
        check(self.prefix_hidden >= 0, f"adapter.prefix_hidden must be >= 0, got {self.prefix_hidden}")

    @property
    def target_patterns(self) -> list[str]:
        """The module name patterns to adapt: `targets`, or the method's default when it is empty."""
        return list(self.targets) or list(DEFAULT_TARGETS[self.method])

    @property
    def scaling(self) -> float:
        """LoRA's multiplier of B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter setting(s) {unknown}; the settings are {sorted(known)}")
        return cls(**d)


# --- names ------------------------------------------------------------------------------------
def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the module called `name` ("blocks.3.attn.q_proj") is targeted by any of `patterns`.

    A pattern targets a module when it is the module's last name component or a dotted suffix of its name
    ("q_proj", "attn.q_proj"), or when it matches the whole name as a regular expression
    (r"blocks\\.[0-3]\\.attn\\.(q|v)_proj"). "all-linear" targets every projection in `ALL_LINEAR`."""
    for pattern in patterns:
        if pattern == "all-linear":
            if name.rsplit(".", 1)[-1] in ALL_LINEAR:
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
        else:
            try:
                if re.fullmatch(pattern, name):
                    return True
            except re.error as e:
                raise ValueError(f"adapter target {pattern!r} is neither a module name nor a valid regular "
                                 f"expression ({e})") from e
    return False


def is_adapter_param(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def adapter_names_in(name: str) -> str | None:
    """The adapter name inside a parameter name: adapters keep their tensors in ModuleDicts / ParameterDicts
    keyed by adapter name, so the component after the marked one ("lora_A.<name>.weight", "ia3_scale.<name>") is
    the name."""
    parts = name.split(".")
    for part, following in zip(parts, parts[1:], strict=False):
        if any(part.startswith(m) for m in ADAPTER_MARKERS):
            return following
    return None


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` (all adapters, or only the one called `name`), detached, on the CPU."""
    out = {}
    for key, t in model.state_dict().items():
        if is_adapter_param(key) and (name is None or adapter_names_in(key) == name):
            out[key] = t.detach().to("cpu").contiguous()
    return out


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.fraction:.4f}%)"


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameters. A 4-bit weight counts its logical element count, not its packed bytes,
    so QLoRA's total is the same model size as the unquantized one."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for module in model.modules():
        logical = getattr(module, "logical_numel", None)  # quantized layers report their unpacked size
        own = sum(p.numel() for p in module.parameters(recurse=False))
        total += own + (logical() if callable(logical) else 0)
    return ParamCount(trainable, total)


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on everything but adapter parameters."""
    for key, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(key))


# --- attach -----------------------------------------------------------------------------------
def apply_adapter(model: nn.Module, cfg: AdapterConfig, name: str = DEFAULT_NAME) -> nn.Module:
    """Attach a fresh adapter called `name` to `model` in place (quantizing the base first for QLoRA), freeze
    everything else, and return the model. Raises ValueError when no module matches `cfg.targets`."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' and '-' (it becomes part of tensor names)")
    if cfg.quantize == "nf4":  # every projection of the base, adapted or not, as QLoRA does; the head stays
        from .nf4 import quantize_linears

        quantize_linears(model, ["all-linear"], block=cfg.quant_block, double_quant=cfg.double_quant)
    if cfg.method == "lora":
        from .lora import add_lora

        add_lora(model, cfg, name)
    elif cfg.method == "ia3":
        from .ia3 import add_ia3

        add_ia3(model, cfg, name)
    else:
        from .prefix import add_prefix

        add_prefix(model, cfg, name)
    freeze_base(model)
    return model


# --- save / load ------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, cfg: AdapterConfig, *, name: str = DEFAULT_NAME,
                 base: str | None = None, metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the adapter `name` of `model` as a directory: adapter_model.safetensors (its tensors under
    adapter-independent names, "<name>" replaced by "default") and adapter_config.json (the method's config,
    the base model it was trained on, free-form metadata). Atomic: a crash never leaves half an adapter."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_adapter_files(model, tmp, cfg, name=name, base=base, metadata=metadata)
    return Path(path)


def write_adapter_files(model: nn.Module, directory: str | Path, cfg: AdapterConfig, *, name: str = DEFAULT_NAME,
                        base: str | None = None, metadata: dict[str, Any] | None = None) -> None:
    """save_adapter's files, written into an existing `directory` without atomicity (for use inside
    `atomic_directory`, as training checkpoints do)."""
    from safetensors.torch import save_file

    tensors = adapter_state_dict(model, name)
    if not tensors:
        raise ValueError(f"the model has no adapter called {name!r}; attach one with apply_adapter first")
    tensors = {_rename(k, name, DEFAULT_NAME): t for k, t in tensors.items()}
    config = {"format": FORMAT, "version": FORMAT_VERSION, "adapter": cfg.to_dict(), "base_model": base,
              "metadata": dict(metadata or {})}
    try:
        text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter metadata must be plain JSON values: {e}") from e
    save_file(tensors, Path(directory) / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (Path(directory) / ADAPTER_CONFIG).write_text(text)


def read_adapter_config(path: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """(the adapter's config, the whole adapter_config.json) of an adapter directory."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an adapter directory: it has no {ADAPTER_CONFIG}")
    d = json.loads(file.read_text())
    if d.get("format") != FORMAT:
        hint = " (a PEFT adapter: use lmlab.tune.lora.load_peft_adapter)" if "peft_type" in d else ""
        raise ValueError(f"{file} is not an lmlab adapter{hint}")
    if d.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file} has adapter format version {d.get('version')!r}; this lmlab reads {FORMAT_VERSION}")
    return AdapterConfig.from_dict(d["adapter"]), d


def load_adapter(model: nn.Module, path: str | Path, name: str = DEFAULT_NAME) -> AdapterConfig:
    """Attach the adapter saved at `path` to `model` under `name` (a second adapter on the same base gets
    another name) and load its weights; every tensor must be present and of the right shape."""
    from safetensors.torch import load_file

    cfg, _ = read_adapter_config(path)
    apply_adapter(model, cfg, name)
    saved = {_rename(k, DEFAULT_NAME, name): t for k, t in load_file(Path(path) / ADAPTER_WEIGHTS).items()}
    load_adapter_weights(model, saved, name, source=str(path))
    return cfg


def load_adapter_weights(model: nn.Module, saved: dict[str, torch.Tensor], name: str, source: str = "") -> None:
    """Copy `saved` (tensors named as in model.state_dict()) into the adapter `name`, strictly."""
    expected = adapter_state_dict(model, name)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter {source or name} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; was it trained on a base with the same architecture?")
    for key, t in saved.items():
        if t.shape != expected[key].shape:
            raise ValueError(f"adapter {source or name}: {key} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, t in saved.items():
            target = params.get(key, buffers.get(key))
            target.copy_(t.to(target.dtype))


def _rename(key: str, old: str, new: str) -> str:
    if old == new:
        return key
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if any(part.startswith(m) for m in ADAPTER_MARKERS) and parts[i + 1] == old:
            parts[i + 1] = new
            return ".".join(parts)
    return key

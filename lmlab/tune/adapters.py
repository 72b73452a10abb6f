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

Several adapters can live on one base under different names, of one method or of several; `apply_adapter(...,
name=...)` adds one, `load_adapter(model, dir, name=...)` loads one. Each method's layers derive from
`AdapterLayer`, so the bookkeeping is written once, here, for all of them: `adapter_names`, `active_adapters`,
`set_active` (which adapters run), `route` (a different adapter per row of a batch), `remove_adapter`, and the
plumbing of the methods' `merge` / `merge_and_unload`. The method files keep only their own math.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..atomic import atomic_directory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_MARKERS = ("lora_", "ia3_", "prefix_", "token_")
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
    # every method: new embedding (and untied head) rows for tokens the base never learned (tune/tokens.py)
    trainable_tokens: list[str] = field(default_factory=list)  # token strings, or "chat": the template's specials
    token_ids: list[int] = field(default_factory=list)  # their ids, resolved with the tokenizer (stored on save)
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


# --- adapter layers: the bookkeeping every method shares --------------------------------------------
class AdapterLayer(nn.Module):
    """A module that carries any number of named adapters of one method (LoRALinear, IA3Linear, LayerPrefix).

    This class holds what the model-level functions below read and write, the same for every method: `active`
    (the adapters that run, in order), `merged` (those folded into the base weights), `base_layer` (the module
    it wraps, or None when it wraps nothing: it then just goes away once empty), and the per-row routing that
    `route` installs. A subclass brings the math: `adapters`, `remove_adapter`, a forward that honours `active`
    (and `route_plan` when `routable`), and, when its adapters can be folded into the base, `merge` /
    `unmerge`."""

    label: ClassVar[str] = "adapter"  # the method's name in messages: "no LoRA adapter called ..."
    routable: ClassVar[bool] = True  # whether `route` can give each row of a batch its own adapter

    def __init__(self, base_layer: nn.Module | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.active: tuple[str, ...] = ()  # the adapters that run
        self.merged: tuple[str, ...] = ()  # the adapters folded into base_layer's weights
        self._routes: tuple[int, Any] | None = None  # set by `route`: (rows, this class's `plan_routes`)

    @property
    def adapters(self) -> list[str]:
        """The adapters this layer has, in the order they were added."""
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        raise NotImplementedError

    def merge(self, names: Sequence[str]) -> None:
        raise ValueError(f"{self.label} adapters cannot be merged into the base weights")

    def unmerge(self) -> None:
        pass

    def can_unmerge(self) -> bool:
        return True

    @classmethod
    def plan_routes(cls, rows: list[str | None], device: torch.device) -> Any:
        """What this kind of layer needs to route `rows` (one adapter name or None per row), computed once
        for all the model's layers of the kind; by default the names themselves."""
        return rows

    @classmethod
    def remove_from_model(cls, model: nn.Module, name: str) -> None:
        """Drop what the adapter `name` keeps on the model itself, outside its layers (nothing by default)."""

    def route_plan(self, batch_size: int) -> Any:
        """The routing plan `route` installed, checked against the batch the layer is given."""
        n_rows, plan = self._routes
        if batch_size != n_rows:
            raise ValueError(f"route() was given {n_rows} rows, but the batch has {batch_size}")
        return plan


Kind = type[AdapterLayer]


def adapter_layers(model: nn.Module, kind: Kind | None = None) -> dict[str, AdapterLayer]:
    """Every adapter layer of `model` (only those of class `kind`, when given), by module name, in model order."""
    kind = kind or AdapterLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def adapter_names(model: nn.Module, kind: Kind | None = None) -> list[str]:
    """The adapters on `model` (of every method, or of `kind`), in model order, each layer's in the order added."""
    names: dict[str, None] = {}
    for layer in adapter_layers(model, kind).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapters(model: nn.Module, kind: Kind | None = None) -> list[str]:
    """The adapters that run (of every method, or of `kind`)."""
    names: dict[str, None] = {}
    for layer in adapter_layers(model, kind).values():
        names.update(dict.fromkeys(layer.active))
    return list(names)


def _label(model: nn.Module, kind: Kind | None) -> str:
    """'LoRA ' when `kind`, or every adapter layer of the model, is of one method; '' when they mix or none is."""
    labels = {kind.label} if kind else {type(m).label for m in adapter_layers(model).values()}
    return f"{labels.pop()} " if len(labels) == 1 else ""


def _names_list(names: str | Iterable[str] | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return list(dict.fromkeys(names))


def _check_known(model: nn.Module, names: Iterable[str], kind: Kind | None = None) -> None:
    known = adapter_names(model, kind)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no {_label(model, kind)}adapter called {unknown} on this model; it has {known or 'none'}")


def _refuse_if_merged(model: nn.Module, doing: str, kind: Kind | None = None) -> None:
    layers = [m for m in adapter_layers(model, kind).values() if m.merged]
    if layers:
        merged = sorted({n for layer in layers for n in layer.merged})
        label = _label(model, type(layers[0]) if len({type(m) for m in layers}) == 1 else None)
        raise ValueError(f"{label}adapters {merged} are merged into the base weights; call unmerge(model) before "
                         f"you {doing}")


def check_new_adapter(model: nn.Module, name: str) -> None:
    """Before adding the adapter `name`: no adapter of any method has that name (the name selects tensors and
    what runs), and nothing is merged."""
    for kind in {type(m) for m in adapter_layers(model).values()}:
        if name in adapter_names(model, kind):
            article = "an" if kind.label[0] in "AEIOUaeiou" else "a"
            raise ValueError(f"the model already has {article} {kind.label} adapter called {name!r}; give the new "
                             "one another name, or remove the old one with remove_adapter(model, name)")
    _refuse_if_merged(model, "add an adapter")


def wrap_and_add(model: nn.Module, chosen: dict[str, nn.Module], kind: Kind, name: str,
                 add: Callable[[AdapterLayer, str], None]) -> list[str]:
    """Wrap each chosen module in a `kind` layer unless it is one already, call `add(layer, module_name)` to give
    it the adapter `name`, and make `name` the one active adapter of this method. Returns the modules' names."""
    for module_name, module in chosen.items():
        if not isinstance(module, kind):
            module = kind(module)
            model.set_submodule(module_name, module)
        add(module, module_name)
    set_active(model, [name], kind)
    return list(chosen)


def _replace(model: nn.Module, module_name: str, module: nn.Module | None) -> None:
    parent, _, attr = module_name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete the adapter `name` from every layer; a layer left without adapters gives its place back to the
    module it wrapped (a wrapper of nothing, like a LayerPrefix, just goes)."""
    _check_known(model, [name])
    _refuse_if_merged(model, "remove an adapter")
    for kind in {type(m) for m in adapter_layers(model).values() if name in m.adapters}:
        kind.remove_from_model(model, name)
    for module_name, layer in adapter_layers(model).items():
        layer.remove_adapter(name)
        layer.active = tuple(n for n in layer.active if n != name)
        if not layer.adapters:
            _replace(model, module_name, layer.base_layer)


def set_active(model: nn.Module, names: str | Iterable[str] | None, kind: Kind | None = None) -> None:
    """Run the adapters `names` (each method combines several its own way: LoRA updates add, IA3 scales multiply,
    prefixes concatenate); None or [] runs the base model alone. With `kind`, only that method's layers change."""
    names = _names_list(names)
    _check_known(model, names, kind)
    _refuse_if_merged(model, "switch adapters", kind)
    for layer in adapter_layers(model, kind).values():
        layer.active = tuple(names)


def module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def route(model: nn.Module, adapter_per_row: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row b of every batch runs the adapter `adapter_per_row[b]` (None: the base model alone):
    one forward pass serves requests for different fine-tunes of the same base. Each kind of layer plans the
    routing once (`plan_routes`: LoRA gathers the rows of each distinct adapter, IA3 stacks per-row scales).
    Prefill and cached decoding steps alike, as long as the rows stay the same. Methods that cannot be routed
    per row (prefix tuning, which changes the attention's length) keep running their active adapters."""
    rows = list(adapter_per_row)
    if not rows:
        raise ValueError("route() needs one adapter name (or None) per row of the batch")
    _check_known(model, [n for n in rows if n is not None])
    _refuse_if_merged(model, "route rows to adapters")
    layers = adapter_layers(model).values()
    for kind in {type(m) for m in layers if not m.routable}:
        fixed = sorted(set(rows) & set(adapter_names(model, kind)))
        if fixed:
            raise ValueError(f"{kind.label} adapters {fixed} cannot be routed per row; run them for the whole batch "
                             "with set_active")
    layers = [m for m in layers if m.routable]
    plans: dict[Kind, Any] = {}
    previous = [layer._routes for layer in layers]
    for layer in layers:
        kind = type(layer)
        if kind not in plans:
            plans[kind] = kind.plan_routes(rows, module_device(model))
        layer._routes = (len(rows), plans[kind])
    try:
        yield
    finally:
        for layer, before in zip(layers, previous, strict=True):
            layer._routes = before


def merge_adapters(model: nn.Module, kind: Kind, names: str | Iterable[str] | None = None) -> None:
    """Fold the adapters of method `kind` into the base weights: the active ones, or those named (which become
    the active ones). The methods' `merge` functions call this."""
    layers = adapter_layers(model, kind)
    if not layers:
        raise ValueError(f"the model has no {kind.label} adapters to merge")
    names = active_adapters(model, kind) if names is None else _names_list(names)
    if not names:
        raise ValueError("no adapter is active, so there is nothing to merge; name one: merge(model, 'name')")
    _check_known(model, names, kind)
    _refuse_if_merged(model, "merge again", kind)
    for layer in layers.values():
        layer.merge(names)
        layer.active = tuple(names)


def unload(model: nn.Module, kind: Kind) -> None:
    """Merge the active adapters of method `kind` (unless merged already) and put every such layer's base layer
    back in its place. The methods' `merge_and_unload` functions call this (and then unfreeze the model)."""
    layers = adapter_layers(model, kind)
    if layers and active_adapters(model, kind) and not any(layer.merged for layer in layers.values()):
        merge_adapters(model, kind)
    for module_name, layer in layers.items():
        model.set_submodule(module_name, layer.base_layer)


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
    if cfg.trainable_tokens and not cfg.token_ids:
        raise ValueError(f"adapter.trainable_tokens {cfg.trainable_tokens} must be resolved to ids with the tokenizer "
                         "first (tune.tokens.resolve_tokens; `lmlab sft` does it)")
    if cfg.token_ids:
        from .tokens import add_token_rows

        add_token_rows(model, cfg.token_ids, name)
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

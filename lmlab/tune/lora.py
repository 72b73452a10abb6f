"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) on the linear layers of a model.

A LoRA adapter leaves the frozen weight W (out x in) alone and learns a rank-r update beside it:

    h = W x + b + s * B A dropout(x)          A: r x in, B: out x r
    s = alpha / r                             (LoRA)
    s = alpha / sqrt(r)                       (rsLoRA: keeps the update's scale stable as r grows)

A starts Kaiming-uniform (a = sqrt(5), nn.Linear's default) and B at zero, so a fresh adapter changes nothing and
the first steps move B. Dropout touches only the adapter's input; the base path sees x itself.

DoRA splits the adapted weight into a learned magnitude per output unit and a direction:

    W' = m * (W + s B A) / ||W + s B A||_row
    h  = W' x + b = W x + b + (m / n - 1) * W x + (m / n) * s B A x,      n = ||W + s B A||_row

The norm is taken over each output row (each output unit's weights: `norm(dim=1)` of the (out, in) matrix; the
paper calls it the column norm of the (in, out) layout, as PEFT does), m starts at ||W||_row so a fresh DoRA
adapter is the identity too, and n is detached from the graph as the paper's section 4.3 recommends ("treat
||V + dV||_c as a constant"), which saves the memory of backpropagating through the norm. With dropout, as in
PEFT, the W x of the DoRA term is computed on the dropped input.

Several adapters can live on one `LoRALinear` under different names. `set_active` chooses which run (their
updates add up); `route` gives each row of a batch its own adapter (or none) within one forward pass, which is
how one base model serves many fine-tunes (both, with `remove_adapter`, are tune/adapters.py's, shared by every
method; this file gives `route` its plan: gather each adapter's rows). `merge` folds the active adapters into W
exactly (the merged layer computes the same function to float rounding) and `unmerge` takes them out again;
`merge_and_unload` returns a plain model with the base's parameter names, ready for `save_checkpoint`.

On a 4-bit base (QLoRA: tune/nf4.py; any module with `in_features`, `out_features`, `bias` and a `dequantize()`
that returns the (out, in) float weight) the adapter runs in float32 beside the quantized matmul, and merging
replaces the 4-bit layer by a float nn.Linear holding its dequantized weight plus the update: folding a float
update into 4-bit codes would lose it, so nothing is silently requantized. `unmerge` puts the original 4-bit
layer back.

PEFT is the library most people use for this; lmlab writes the mechanism by hand so it can be read next to the
equations above, and keeps PEFT as its oracle: tests/tune/test_lora_peft.py checks outputs and gradients against
PEFT on the same Hugging Face Llama, and `export_peft` / `load_peft_adapter` move adapters between the two.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_directory
from . import adapters
from .adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_NAME,
    AdapterConfig,
    AdapterLayer,
    apply_adapter,
    is_adapter_param,
    load_adapter_weights,
    matches,
)

# The model-level bookkeeping every method shares (tune/adapters.py), re-exported as this module's API too:
from .adapters import active_adapters as active_adapters
from .adapters import adapter_names as adapter_names
from .adapters import remove_adapter as remove_adapter
from .adapters import route as route
from .adapters import set_active as set_active

# PEFT wraps a transformers model as PeftModel(base_model=LoraModel(model=...)): its tensor names start so.
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # the pickle PEFT wrote before safetensors


def _is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer stored in another form (4-bit NF4): it computes x W^T + b and can hand out W."""
    return (not isinstance(module, nn.Linear) and callable(getattr(module, "dequantize", None))
            and hasattr(module, "in_features") and hasattr(module, "out_features"))


class LoRALinear(AdapterLayer):
    """A frozen linear layer (`base_layer`) plus any number of named LoRA / DoRA adapters.

    State-dict names follow PEFT's: `base_layer.weight`, `lora_A.<name>.weight`, `lora_B.<name>.weight`,
    `lora_magnitude_vector.<name>` (DoRA). Which adapters run is per module state (`active`, `merged`; see
    adapters.AdapterLayer) set by the model-level functions (`set_active`, `route`, `merge`), so one model can
    hold and switch many adapters.
    """

    label = "LoRA"

    def __init__(self, base_layer: nn.Module):
        if not (isinstance(base_layer, nn.Linear) or _is_quantized_linear(base_layer)):
            raise TypeError(f"LoRALinear wraps nn.Linear or a quantized linear layer, not {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self._merge_norms: dict[str, torch.Tensor] = {}  # DoRA's n at merge time, to unmerge exactly
        # The 4-bit layer a merge replaced by its float copy, kept for unmerge. A plain list, so it is not a
        # submodule: the merged module's state dict holds only the float weight.
        self._quantized_base: list[nn.Module] = []
        self.train(base_layer.training)

    # --- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0, dora: bool = False) -> None:
        """A fresh adapter, made the active one: A Kaiming-uniform, B zero (PEFT's default init); DoRA's
        m = ||W||_row."""
        if name in self.lora_A:
            raise ValueError(f"this layer already has an adapter called {name!r}")
        device = adapters.module_device(self.base_layer)
        # Adapters train in at least float32 (as PEFT casts them): on a bf16 or 4-bit base the update's small
        # steps would otherwise round away.
        base_dtype = self.base_layer.weight.dtype if isinstance(self.base_layer, nn.Linear) else torch.float32
        dtype = torch.promote_types(base_dtype, torch.float32)
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = float(scaling)
        if dora:
            with torch.no_grad():
                magnitude = self.base_weight().to(dtype).norm(dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude)
        for module in (A, B, self.lora_dropout[name]):
            module.train(self.training)
        self.active = (name,)

    def remove_adapter(self, name: str) -> None:
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        self.scaling.pop(name, None)

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def base_weight(self) -> torch.Tensor:
        """W (out, in) as a float tensor: the weight itself, or the dequantized one of a 4-bit base."""
        if isinstance(self.base_layer, nn.Linear):
            return self.base_layer.weight
        return self.base_layer.dequantize()

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self._routes is not None:
            return self._routed_forward(x, base)
        out = base
        for name in self.active:
            if name in self.lora_A and name not in self.merged:
                out = out + self.delta(name, x, base)
        return out

    def delta(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output `base` (= W x + b) for the input x."""
        A, B = self.lora_A[name], self.lora_B[name]
        dropout, s = self.lora_dropout[name], self.scaling[name]
        xa = x.to(A.weight.dtype)
        if name not in self.lora_magnitude_vector:
            return (B(A(dropout(xa))) * s).to(base.dtype)
        weight = self.base_weight().to(xa.dtype)
        with torch.no_grad():  # n, detached (DoRA sec. 4.3)
            norm = (weight + s * (B.weight @ A.weight)).norm(dim=1)
        k = self.lora_magnitude_vector[name] / norm  # m / n, one per output unit
        if isinstance(dropout, nn.Identity) or not self.training:
            wx = base.to(xa.dtype)  # W x from the base output, without recomputing it
            if self.base_layer.bias is not None:
                wx = wx - self.base_layer.bias.to(xa.dtype)
        else:
            xa = dropout(xa)
            wx = F.linear(xa, weight)
        return ((k - 1) * wx + k * s * B(A(xa))).to(base.dtype)

    @classmethod
    def plan_routes(cls, rows: list[str | None], device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """(adapter, the indices of the rows that use it, or None when every row does), per distinct adapter:
        each layer computes each adapter's update on its rows only (a gather along the batch dimension of its
        input) and adds it back (index_add)."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            if name is not None:
                groups.setdefault(name, []).append(i)
        return [(name, None if len(idx) == len(rows) else torch.tensor(idx, device=device))
                for name, idx in groups.items()]

    def _routed_forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        out = base
        for name, rows in self.route_plan(x.shape[0]):  # one gather per distinct adapter, never a loop over rows
            if name not in self.lora_A:
                continue
            if rows is None:  # every row uses it
                out = out + self.delta(name, x, base)
            else:
                rows = rows.to(x.device)
                out = out.index_add(0, rows, self.delta(name, x[rows], base[rows]))
        return out

    # --- merge ----------------------------------------------------------------------------------
    def _merge_terms(self, names: Sequence[str], weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, D) with merged W' = c[:, None] * W + D, in float32, summing the adapters' updates as `forward`
        does: LoRA adds s B A; DoRA adds (m/n - 1) W + (m/n) s B A. With `weight` (the unmerged W) DoRA's norms
        are computed and kept; without, the kept ones are used (to unmerge)."""
        device = self.lora_A[names[0]].weight.device
        c = torch.ones(self.out_features, device=device, dtype=torch.float32)
        D = torch.zeros(self.out_features, self.in_features, device=device, dtype=torch.float32)
        for name in names:
            d = self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())
            if name in self.lora_magnitude_vector:
                if weight is not None:
                    self._merge_norms[name] = (weight.float().to(device) + d).norm(dim=1)
                k = self.lora_magnitude_vector[name].float() / self._merge_norms[name]
                c += k - 1
                d = k[:, None] * d
            D += d
        return c, D

    @torch.no_grad()
    def merge(self, names: Sequence[str]) -> None:
        """Fold the adapters `names` (those this layer has) into the base weight."""
        if self.merged:
            raise ValueError(f"adapters {list(self.merged)} are merged already; unmerge first")
        names = [n for n in names if n in self.lora_A]
        if not names:
            return
        if not isinstance(self.base_layer, nn.Linear):  # 4-bit: merge into a float copy, keep the original
            quantized = self.base_layer
            self.base_layer = _dequantized_linear(quantized)
            self._quantized_base.append(quantized)
        weight = self.base_layer.weight
        c, D = self._merge_terms(names, weight)
        weight.copy_((c[:, None] * weight.float() + D.to(weight.device)).to(weight.dtype))
        self.merged = tuple(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapters out of the base weight again: W = (W' - D) / c (float rounding aside), or
        the original 4-bit layer back."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self._quantized_base:
            self.base_layer = self._quantized_base.pop().to(weight.device)
        else:
            c, D = self._merge_terms(self.merged, None)
            weight.copy_(((weight.float() - D.to(weight.device)) / c[:, None].to(weight.device)).to(weight.dtype))
        self.merged = ()
        self._merge_norms.clear()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"


@torch.no_grad()
def _dequantized_linear(module: nn.Module) -> nn.Linear:
    """A float nn.Linear computing what the quantized `module` computes, frozen as the base was."""
    weight = module.dequantize()
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    return linear.requires_grad_(False).train(module.training)


# --- finding and wrapping layers ----------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model`, by module name."""
    return adapters.adapter_layers(model, LoRALinear)


def _targetable(model: nn.Module) -> dict[str, nn.Module]:
    """The layers LoRA may adapt, by name: linear layers (plain or quantized) and existing LoRALinears, never
    the output head, nor anything inside a LoRALinear (its own A and B are nn.Linear too)."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoRALinear):
            inside.append(name + ".")
        elif not (isinstance(module, nn.Linear) or _is_quantized_linear(module)):
            continue
        if name.rsplit(".", 1)[-1] == "lm_head" or is_adapter_param(name):
            continue
        found[name] = module
    return found


def add_lora(model: nn.Module, cfg: AdapterConfig, name: str = DEFAULT_NAME) -> list[str]:
    """Attach a fresh LoRA (or DoRA) adapter `name` to every linear layer whose name matches
    `cfg.target_patterns`, and make it the one active adapter. A layer that already carries adapters gets one
    more. Returns the adapted layers' names. `adapters.apply_adapter` calls this and then freezes the base."""
    if cfg.method != "lora":
        raise ValueError(f"add_lora needs an adapter config with method='lora', got {cfg.method!r}")
    adapters.check_new_adapter(model, name)
    candidates = _targetable(model)
    chosen = [n for n in candidates if matches(n, cfg.target_patterns)]
    if not chosen:
        examples = list(candidates)[:6]
        raise ValueError(
            f"adapter targets {cfg.target_patterns} match no linear layer of this model. A target is a layer's "
            "last name ('q_proj'), a dotted suffix ('attn.q_proj'), a regular expression over the whole name, or "
            f"'all-linear'; this model's layers are named like {examples}")
    return adapters.wrap_and_add(model, {n: candidates[n] for n in chosen}, LoRALinear, name,
                        lambda layer, _: layer.add_adapter(name, cfg.r, cfg.scaling, cfg.dropout, cfg.dora))


# --- merge ------------------------------------------------------------------------------------------
def merge(model: nn.Module, name: str | Iterable[str] | None = None) -> None:
    """Fold adapters into the base weights: the active ones, or those named (which become the active ones).
    The model then computes the same outputs as before (to float rounding) without the adapters' extra matmuls.
    On a 4-bit base, a merged layer holds a float copy of the dequantized weight (see the module docstring)."""
    adapters.merge_adapters(model, LoRALinear, name)


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: the base weights as they were (to float rounding; a 4-bit base exactly) and the adapters
    running beside them again."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters (unless merged already) and replace every LoRALinear by its base layer, and
    every 4-bit layer by a float nn.Linear: the result is the plain model, with exactly the base's parameter
    names, every parameter trainable again. Changes `model` in place and returns it."""
    others = sorted({k for k in model.state_dict()
                     if is_adapter_param(k) and "lora_" not in k and "token_delta" not in k})
    if others:
        raise ValueError(f"the model carries adapter tensors of another method ({others[:3]}...); merge_and_unload "
                         "folds LoRA adapters only")
    adapters.unload(model, LoRALinear)
    from .tokens import fold_tokens

    fold_tokens(model)  # trainable token rows: their deltas written into the embedding (and head)
    for layer_name, module in list(model.named_modules()):
        if _is_quantized_linear(module):  # QLoRA quantized every projection, adapted or not
            model.set_submodule(layer_name, _dequantized_linear(module))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- PEFT's format -------------------------------------------------------------------------------------
def _hf_module_map(model: nn.Module) -> tuple[str, dict[str, str], dict[str, str]]:
    """(HF model_type, lmlab module -> HF module for 1:1 layers, lmlab module -> HF module for layers HF stores
    fused with others), from the converter's table (model/hub.py) of the family the model came from."""
    from ..model.hub import FAMILIES, lmlab_config_to_hf

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_layers"):
        raise ValueError("PEFT's format names tensors after a Hugging Face model: this needs an lmlab Transformer")
    model_type = cfg.meta.get("hf_model_type") or lmlab_config_to_hf(cfg)["model_type"]
    single: dict[str, str] = {}
    fused: dict[str, str] = {}
    for lm, hf in FAMILIES[model_type].modules.items():
        for i in range(cfg.n_layers) if "{i}" in hf else [0]:
            if isinstance(lm, str):
                single[lm.format(i=i)] = hf.format(i=i)
            else:
                fused.update({m.format(i=i): hf.format(i=i) for m in lm})
    return model_type, single, fused


def _compact_targets(chosen: Iterable[str], candidates: Iterable[str]) -> list[str]:
    """Target patterns that select exactly `chosen` among `candidates`: their last names ("q_proj") when those
    select nothing else, else the full names."""
    chosen = set(chosen)
    leaves = {n.rsplit(".", 1)[-1] for n in chosen}
    if {c for c in candidates if c.rsplit(".", 1)[-1] in leaves} == chosen:
        return sorted(leaves)
    return sorted(chosen)


def _fused_error(lm: str, hf: str, model_type: str) -> ValueError:
    return ValueError(f"{lm} is part of {hf}, which Hugging Face {model_type} stores fused with other projections; "
                      "a PEFT adapter on the fused layer does not map to lmlab's separate layers. Target the "
                      "layers HF keeps separate (e.g. o_proj, down_proj) for adapters you exchange with PEFT")


def export_peft(model: nn.Module, out_dir: str | Path, cfg: AdapterConfig, name: str = DEFAULT_NAME,
                base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the LoRA adapter `name` of `model` (an lmlab Transformer converted from, or convertible to, a Hugging
    Face family) as a PEFT adapter directory: adapter_config.json and adapter_model.safetensors with PEFT's tensor
    names, which `peft.PeftModel.from_pretrained(hf_model, out_dir)` loads. Atomic."""
    if cfg.method != "lora":
        raise ValueError(f"PEFT export is for LoRA adapters; this config is method={cfg.method!r}")
    if cfg.token_ids:
        raise ValueError("this adapter also trains token rows (adapter.trainable_tokens), which the PEFT export does "
                         "not write yet; merge it into a full checkpoint instead (lmlab adapter merge)")
    layers = {n: layer for n, layer in lora_layers(model).items() if name in layer.lora_A}
    if not layers:
        raise ValueError(f"the model has no LoRA adapter called {name!r}; it has {adapter_names(model) or 'none'}")
    model_type, single, fused = _hf_module_map(model)
    from ..model.hub import FAMILIES

    conv1d = FAMILIES[model_type].conv1d
    tensors: dict[str, torch.Tensor] = {}
    hf_chosen = []
    for lm, layer in layers.items():
        _check_matches_config(lm, layer, name, cfg)
        if lm in fused:
            raise _fused_error(lm, fused[lm], model_type)
        if lm not in single:
            raise ValueError(f"{lm} has no counterpart in Hugging Face {model_type}")
        hf = single[lm]
        hf_chosen.append(hf)
        prefix = PEFT_PREFIX + hf
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_A[name].weight
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_B[name].weight
        if name in layer.lora_magnitude_vector:
            tensors[f"{prefix}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    candidates = [single.get(n) or fused[n] for n in _targetable(model) if n in single or n in fused]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _compact_targets(hf_chosen, candidates),
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": any(h.endswith(conv1d) for h in hf_chosen),  # GPT-2's Conv1D stores W transposed
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    from safetensors.torch import save_file

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def _check_matches_config(lm: str, layer: LoRALinear, name: str, cfg: AdapterConfig) -> None:
    r = layer.lora_A[name].weight.shape[0]
    dora = name in layer.lora_magnitude_vector
    if r != cfg.r or dora != cfg.dora or not math.isclose(layer.scaling[name], cfg.scaling, rel_tol=1e-9):
        raise ValueError(f"the config does not describe adapter {name!r} on {lm} (rank {r}, dora={dora}, scaling "
                         f"{layer.scaling[name]:g}; config: rank {cfg.r}, dora={cfg.dora}, scaling {cfg.scaling:g}); "
                         "pass the config the adapter was created with")


_PEFT_TENSOR = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# PEFT LoRA settings lmlab's LoRALinear does not have, and the value meaning "not used"
_PEFT_UNSUPPORTED = {"bias": "none", "lora_bias": False, "modules_to_save": None, "rank_pattern": {},
                     "alpha_pattern": {}, "use_qalora": False, "target_parameters": None,
                     "trainable_token_indices": None, "layer_replication": None, "alora_invocation_tokens": None}


def read_peft_config(path: str | Path) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA adapter directory, refusing settings lmlab cannot reproduce."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}")
    d = json.loads(file.read_text())
    if "peft_type" not in d:
        raise ValueError(f"{file} is not a PEFT adapter config (no peft_type); an lmlab adapter loads with "
                         "lmlab.tune.adapters.load_adapter")
    if d["peft_type"] != "LORA":
        raise ValueError(f"{file} is a PEFT {d['peft_type']} adapter; lmlab reads PEFT LoRA adapters only")
    used = [f"{k}={d[k]!r}" for k, unused in _PEFT_UNSUPPORTED.items() if d.get(k) not in (unused, None, {}, [])]
    if used:
        raise ValueError(f"{file} uses PEFT LoRA settings lmlab does not implement: {', '.join(used)}")
    return d


def _read_peft_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(path / ADAPTER_WEIGHTS)
    if (path / PEFT_WEIGHTS_BIN).is_file():  # weights_only: loading runs no code
        return torch.load(path / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has no {ADAPTER_WEIGHTS} (or {PEFT_WEIGHTS_BIN})")


def load_peft_adapter(model: nn.Module, peft_dir: str | Path, name: str = DEFAULT_NAME) -> AdapterConfig:
    """Attach a PEFT LoRA adapter (trained on the Hugging Face model `model` was converted from) to `model` under
    `name`, freezing the base as `apply_adapter` does. Returns the equivalent lmlab AdapterConfig, whose targets
    select exactly the layers the adapter's tensors cover."""
    peft_dir = Path(peft_dir)
    d = read_peft_config(peft_dir)
    model_type, single, fused = _hf_module_map(model)
    to_lmlab = {hf: lm for lm, hf in single.items()}
    fused_hf = {hf: lm for lm, hf in fused.items()}
    from ..model.hub import FAMILIES

    base_prefix = FAMILIES[model_type].base_prefix
    targetable = _targetable(model)
    saved: dict[str, torch.Tensor] = {}
    ranks = set()
    for key, t in _read_peft_tensors(peft_dir).items():
        m = _PEFT_TENSOR.fullmatch(key.removeprefix(PEFT_PREFIX))
        if m is None:
            raise ValueError(f"{peft_dir}: tensor {key} is not a LoRA A/B matrix or DoRA magnitude of a linear layer "
                             "(LoRA on embeddings and trainable extra modules are not supported)")
        hf = m["module"]
        if not hf.startswith((base_prefix, "lm_head")):  # saved from the bare base model (LlamaModel)
            hf = base_prefix + hf
        if hf in fused_hf:
            raise _fused_error(fused_hf[hf], hf, model_type)
        lm = to_lmlab.get(hf)
        if lm is None or lm not in targetable:
            raise ValueError(f"{peft_dir}: {hf} is not a linear layer lmlab can adapt in this {model_type} model")
        kind = m["kind"]
        if kind == "lora_A.weight":
            ranks.add(t.shape[0])
        lm_key = {"lora_A.weight": f"lora_A.{name}.weight", "lora_B.weight": f"lora_B.{name}.weight",
                  "lora_magnitude_vector": f"lora_magnitude_vector.{name}"}[kind]
        saved[f"{lm}.{lm_key}"] = t
    if ranks != {int(d["r"])}:
        raise ValueError(f"{peft_dir}: adapter_config.json says r={d['r']}, the tensors have ranks {sorted(ranks)}")
    chosen = sorted({k.split(".lora_")[0] for k in saved})
    cfg = AdapterConfig(method="lora", r=int(d["r"]), alpha=float(d["lora_alpha"]),
                        dropout=float(d.get("lora_dropout") or 0.0),
                        targets=_compact_targets(chosen, targetable),
                        rslora=bool(d.get("use_rslora")), dora=bool(d.get("use_dora")))
    apply_adapter(model, cfg, name)
    load_adapter_weights(model, saved, name, source=str(peft_dir))
    return cfg


def is_peft_adapter(path: str | Path) -> bool:
    try:
        return "peft_type" in json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return False


def adapter_summary(path: str | Path) -> dict[str, Any]:
    """What an adapter directory (lmlab's format or PEFT's) holds: method, rank, targets, parameter count, base,
    read from its config and the safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    from .adapters import read_adapter_config

    path = Path(path)
    if is_peft_adapter(path):
        d = read_peft_config(path)
        cfg = AdapterConfig(r=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout") or 0),
                            rslora=bool(d.get("use_rslora")), dora=bool(d.get("use_dora")))
        info: dict[str, Any] = {"format": "peft", "method": "dora" if cfg.dora else "lora", "r": cfg.r,
                                "alpha": cfg.alpha, "scaling": cfg.scaling, "rslora": cfg.rslora,
                                "targets": d.get("target_modules"), "base": d.get("base_model_name_or_path")}
    else:
        cfg, d = read_adapter_config(path)
        info = {"format": "lmlab", "method": cfg.method, "base": d.get("base_model"),
                "targets": cfg.target_patterns}
        if cfg.method == "lora":
            info.update(method="dora" if cfg.dora else "lora", r=cfg.r, alpha=cfg.alpha, scaling=cfg.scaling,
                        rslora=cfg.rslora, dropout=cfg.dropout, quantize=cfg.quantize)
        elif cfg.method == "prefix":
            info.update(prefix_len=cfg.prefix_len, targets=[])
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_WEIGHTS}")
    with safe_open(weights, "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    info["parameters"] = sum(math.prod(s) for s in shapes)
    info["tensors"] = len(shapes)
    info["file_bytes"] = weights.stat().st_size
    return info


def attach_adapter_dir(model: nn.Module, path: str | Path, name: str = DEFAULT_NAME) -> AdapterConfig:
    """Attach the adapter saved at `path`, in lmlab's format (adapters.load_adapter) or PEFT's."""
    if is_peft_adapter(path):
        return load_peft_adapter(model, path, name)
    from .adapters import load_adapter

    return load_adapter(model, path, name)

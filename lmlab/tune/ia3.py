"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): "Infused Adapter by Inhibiting and Amplifying Inner Activations".

IA3 learns three vectors per block, initialized to ones, that rescale activations elementwise:

    K' = l_k * (x W_k^T + b_k)          the keys (output of k_proj)
    V' = l_v * (x W_v^T + b_v)          the values (output of v_proj)
    y  = (l_ff * h) W_down^T + b_down   the feed-forward activation h (the *input* of down_proj)

so a fresh adapter changes nothing, and an adapter costs d_k + d_v + d_ff numbers per block. Which linear layers
are adapted is `AdapterConfig.target_patterns` (default k_proj, v_proj, down_proj); a targeted layer that also
matches `AdapterConfig.feedforward` has its input rescaled, any other its output.

Because a scale is diagonal it folds into the weight: an output scale multiplies the rows of W and the bias
(W' = diag(l) W, b' = l * b), an input scale its columns (W' = W diag(l)). `merge` does that, so a merged model
runs at the base's speed; `unmerge` divides the scales out again (exact up to float rounding; a scale with a zero
entry erased that row or column, so such a merge cannot be undone and `unmerge` says so).

Several adapters can live on one `IA3Linear` under different names, with the same model-level interface as
tune/lora.py (written once in tune/adapters.py, for every method): `set_active` chooses which run (their scales
multiply), `route` gives each row of a batch its own adapter within one forward pass, `merge` / `unmerge` /
`merge_and_unload`. State-dict names follow PEFT's layout
(`base_layer.weight`, `ia3_scale.<name>` where PEFT says `ia3_l.<name>`).

PEFT implements IA3 too; lmlab writes it by hand because the point is to read it next to the equations above, and
keeps PEFT as the oracle: tests/tune/test_ia3.py checks logits and gradients against PEFT on the same Llama.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import adapters
from .adapters import DEFAULT_NAME, AdapterConfig, AdapterLayer, is_adapter_param, matches

# The model-level bookkeeping every method shares (tune/adapters.py), re-exported as this module's API too:
from .adapters import active_adapters as active_adapters
from .adapters import adapter_names as adapter_names
from .adapters import remove_adapter as remove_adapter
from .adapters import route as route
from .adapters import set_active as set_active


class IA3Linear(AdapterLayer):
    """A frozen nn.Linear (`base_layer`) plus any number of named IA3 scale vectors (`ia3_scale`), each rescaling
    either the layer's output (shape (out_features,)) or, for a feed-forward layer, its input (in_features,).
    Which run is per module state (`active`, `merged`; see adapters.AdapterLayer)."""

    label = "IA3"

    def __init__(self, base_layer: nn.Linear):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"IA3Linear wraps nn.Linear, not {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.ia3_scale = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}  # per adapter: True rescales the input, False the output
        # the (input, output) scales as they were when merged: unmerge divides by these, even if the adapter's
        # parameters changed since (a merged model is for inference, but a stray optimizer step must not corrupt W)
        self._merged_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    # --- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, feedforward: bool) -> None:
        """A fresh scale vector of ones. It is kept in at least float32 (as PEFT and tune/lora.py keep adapters):
        on a bf16 base, steps smaller than bf16's spacing near 1 (2^-8) would otherwise round away."""
        if name in self.ia3_scale:
            raise ValueError(f"this layer already has an IA3 adapter called {name!r}")
        weight = self.base_layer.weight
        size = self.in_features if feedforward else self.out_features
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.ia3_scale[name] = nn.Parameter(torch.ones(size, device=weight.device, dtype=dtype))
        self.feedforward[name] = feedforward

    def remove_adapter(self, name: str) -> None:
        if name in self.ia3_scale:
            del self.ia3_scale[name]
        self.feedforward.pop(name, None)

    @property
    def adapters(self) -> list[str]:
        return list(self.ia3_scale.keys())

    # --- forward --------------------------------------------------------------------------------
    def scales(self, names: Iterable[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input scale, output scale): the products of the scales of the adapters `names` that this layer has,
        each None when no such adapter rescales that side."""
        s_in = s_out = None
        for name in names:
            if name not in self.ia3_scale:
                continue
            s = self.ia3_scale[name]
            if self.feedforward[name]:
                s_in = s if s_in is None else s_in * s
            else:
                s_out = s if s_out is None else s_out * s
        return s_in, s_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._routes is not None:
            return self._routed_forward(x)
        s_in, s_out = self.scales(n for n in self.active if n not in self.merged)
        if s_in is not None:
            x = x * s_in.to(x.dtype)
        y = self.base_layer(x)
        return y if s_out is None else y * s_out.to(y.dtype)

    def _routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Row b rescaled by the adapter routed to it: the per-row scales are stacked into a (B, 1, features)
        tensor (ones for rows without an adapter), one elementwise product per side for the whole batch."""
        per_row = [self.scales([] if name is None else [name]) for name in self.route_plan(x.shape[0])]
        s_in = self._stack([s for s, _ in per_row], self.in_features, x)
        if s_in is not None:
            x = x * s_in
        y = self.base_layer(x)
        s_out = self._stack([s for _, s in per_row], self.out_features, y)
        return y if s_out is None else y * s_out

    @staticmethod
    def _stack(scales: list[torch.Tensor | None], size: int, like: torch.Tensor) -> torch.Tensor | None:
        if all(s is None for s in scales):
            return None
        ones = like.new_ones(size)
        rows = torch.stack([ones if s is None else s.to(like.dtype) for s in scales])  # (B, size)
        return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), size)

    # --- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Sequence[str]) -> None:
        """Fold the scales of `names` (those this layer has) into the base: rows of W and b for an output scale,
        columns of W for an input scale. Computed in at least float32, then rounded once to the weight's dtype."""
        if self.merged:
            raise ValueError(f"adapters {list(self.merged)} are merged already; unmerge first")
        names = [n for n in names if n in self.ia3_scale]
        if not names:
            return
        s_in, s_out = self.scales(names)
        dtype = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        self._merged_scales = tuple(None if s is None else s.detach().to(dtype, copy=True) for s in (s_in, s_out))
        self._rescale(*self._merged_scales, invert=False)
        self.merged = tuple(names)

    def can_unmerge(self) -> bool:
        return all(s is None or bool((s != 0).all()) for s in self._merged_scales)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged scales out of the base again (float rounding aside)."""
        if not self.merged:
            return
        if not self.can_unmerge():
            raise ValueError("a merged IA3 scale has zero entries: the rows/columns it multiplied are lost, so the "
                             "merge cannot be undone; reload the base model")
        self._rescale(*self._merged_scales, invert=True)
        self.merged = ()
        self._merged_scales = (None, None)

    def _rescale(self, s_in: torch.Tensor | None, s_out: torch.Tensor | None, invert: bool) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        dtype = torch.promote_types(weight.dtype, torch.float32)
        w = weight.to(dtype)
        if s_out is not None:
            s = s_out.to(w.device, dtype)
            w = w / s[:, None] if invert else w * s[:, None]
            if bias is not None:
                b = bias.to(dtype)
                bias.copy_((b / s if invert else b * s).to(bias.dtype))
        if s_in is not None:
            s = s_in.to(w.device, dtype)
            w = w / s[None, :] if invert else w * s[None, :]
        weight.copy_(w.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"


# --- finding and wrapping layers ----------------------------------------------------------------------
def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """Every IA3Linear of `model`, by module name."""
    return adapters.adapter_layers(model, IA3Linear)


def _targetable(model: nn.Module) -> dict[str, nn.Module]:
    """The modules IA3 may target, by name: every module except the model itself, what lives inside an
    IA3Linear (its base layer) and adapter modules of other methods."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside) or is_adapter_param(name):
            continue
        if isinstance(module, IA3Linear):
            inside.append(name + ".")
        found[name] = module
    return found


def add_ia3(model: nn.Module, cfg: AdapterConfig, name: str = DEFAULT_NAME) -> list[str]:
    """Attach a fresh IA3 adapter `name` (every scale 1) to each linear layer whose name matches
    `cfg.target_patterns`, rescaling the input of those that also match `cfg.feedforward` and the output of the
    others, and make it the one active adapter. Returns the adapted layers' names. `adapters.apply_adapter`
    calls this and then freezes the base."""
    if cfg.method != "ia3":
        raise ValueError(f"add_ia3 needs an adapter config with method='ia3', got {cfg.method!r}")
    adapters.check_new_adapter(model, name)
    candidates = _targetable(model)
    chosen = {n: m for n, m in candidates.items() if matches(n, cfg.target_patterns)}
    if not chosen:
        examples = [n for n, m in candidates.items() if isinstance(m, (nn.Linear, IA3Linear))][:6]
        raise ValueError(
            f"adapter targets {cfg.target_patterns} match no layer of this model. A target is a layer's last name "
            "('k_proj'), a dotted suffix ('attn.k_proj'), a regular expression over the whole name, or "
            f"'all-linear'; this model's linear layers are named like {examples}")
    wrong = {n: type(m).__name__ for n, m in chosen.items() if not isinstance(m, (nn.Linear, IA3Linear))}
    if wrong:  # before changing anything, so a bad target leaves the model as it was
        raise ValueError(f"IA3 rescales linear layers, but adapter targets {cfg.target_patterns} also select "
                         f"{dict(list(wrong.items())[:4])}; narrow the targets to linear layers")
    return adapters.wrap_and_add(model, chosen, IA3Linear, name,
                        lambda layer, layer_name: layer.add_adapter(name, matches(layer_name, cfg.feedforward)))


# --- merge ------------------------------------------------------------------------------------------
def merge(model: nn.Module, name: str | Iterable[str] | None = None) -> None:
    """Fold adapters into the base weights: the active ones, or those named (which become the active ones).
    The model then computes the same outputs (to float rounding) with no elementwise products left."""
    adapters.merge_adapters(model, IA3Linear, name)


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: the base weights as they were (to float rounding) and the scales applied beside them again.
    Raises (changing nothing) when a merged scale has a zero entry, which no division can undo."""
    layers = ia3_layers(model)
    stuck = [n for n, layer in layers.items() if not layer.can_unmerge()]
    if stuck:
        raise ValueError(f"merged IA3 scales of {stuck[:4]} have zero entries: the rows/columns they multiplied "
                         "are lost, so the merge cannot be undone; reload the base model")
    for layer in layers.values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters (unless merged already) and replace every IA3Linear by its base layer: the result
    is the plain model, with exactly the base's parameter names, every parameter trainable again. In place."""
    adapters.unload(model, IA3Linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model

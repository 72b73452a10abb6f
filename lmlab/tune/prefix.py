"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

The base model stays frozen; every attention layer gets P learned key and value vectors per KV head that each
query attends to before the sequence's own keys and values. For a query q at position t of head h:

    attn(q) = softmax([q K_p^T ; q K_{<=t}^T] * scale) [V_p ; V_{<=t}]

with K_p, V_p (P, head_dim) the prefix of h's KV head. A prefix acts like a prompt the model has already read,
reduced to what attention sees of it (a KV cache), except that it is free to be any vector rather than one
a real text produces.

Conventions (model/attention.py `prepend_prefix` implements the attention side):
- The prefix has no position: no rotary rotation is applied to its keys (RoPE rotates the queries and the
  sequence's keys only), every query sees all of it (no causal or sliding-window limit; a padding or packed
  mask leaves it visible), its ALiBi distance is 0, and it is never stored in the KV cache.
- The real tokens keep positions 0..T-1, the positions they have without a prefix: the base model's
  computation on the tokens is unchanged, and a prefix that gets no attention weight (its scores -> -inf)
  gives exactly the base model. PEFT, which feeds the prefix to Hugging Face models as a past-key-value cache,
  places the tokens at P..P+T-1 instead; passing `positions = P + arange(T)` reproduces it (the PEFT parity test
  in tests/tune/test_prefix.py does).
- Initialization: from the activations of real words, which the paper found better than random vectors: the
  prefix of slot j starts as the key and value that a random vocabulary token has at position 0 (the token
  alone: at position 0 RoPE is the identity, so that key is a valid un-rotated prefix key).
- Reparameterization (`AdapterConfig.prefix_hidden` > 0): learning the prefixes directly is unstable, so the
  paper learns a smaller matrix P' and an MLP instead, P_theta[j, :] = MLP(P'[j, :]), one MLP producing the keys
  and values of every layer. Here P' is (P, n_kv_heads * head_dim) and the MLP is Linear -> tanh -> Linear to
  n_layers * 2 * n_kv_heads * head_dim values per slot, ordered (layer, key/value, head, dim): the layout of
  PEFT's prefix encoder (P' as nn.Embedding initializes it, N(0, 1); the linears as nn.Linear does), so the same
  weights give the same prefixes. After training, `fold_prefix` evaluates the MLP once and keeps only the plain
  prefixes, as the paper does for inference.

Parameters: `blocks.<i>.attn.prefix.prefix_k.<name>` and `prefix_v.<name>`, (n_kv_heads, P, head_dim) each, or,
reparameterized, `prefix_encoder.<name>.embedding` and `prefix_encoder.<name>.mlp.*` on the model. Several
adapters can live on one model; `set_active` chooses which run (their prefixes are concatenated, in that order;
None or [] runs the plain attention path) and `remove_adapter` deletes one (both are tune/adapters.py's, shared by
every method).

Written by hand because PEFT's mechanism (a past-key-value cache handed to a Hugging Face model) does not apply to
lmlab's model; PEFT is the oracle in the tests, on the same Llama.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters
from .adapters import DEFAULT_NAME, AdapterConfig, AdapterLayer

# The model-level bookkeeping every method shares (tune/adapters.py), re-exported as this module's API too:
from .adapters import active_adapters as active_adapters
from .adapters import adapter_names as adapter_names
from .adapters import remove_adapter as remove_adapter
from .adapters import set_active as set_active

ENCODERS = "prefix_encoder"  # the model attribute holding the reparameterization MLPs, by adapter name


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterization of one adapter: P' (P, n_kv_heads * head_dim) -> Linear -> tanh -> Linear
    -> the keys and values of every layer."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, length: int, hidden: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.n_layers, self.n_kv_heads, self.head_dim, self.length = n_layers, n_kv_heads, head_dim, length
        width = n_kv_heads * head_dim
        self.embedding = nn.Parameter(torch.randn(length, width, device=device, dtype=dtype))
        self.mlp = nn.Sequential(nn.Linear(width, hidden, device=device, dtype=dtype), nn.Tanh(),
                                 nn.Linear(hidden, n_layers * 2 * width, device=device, dtype=dtype))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (keys, values), each (n_kv_heads, P, head_dim). Only that layer's rows of the last linear
        are evaluated, so the layers together cost one pass of the MLP (plus the small first linear each)."""
        hidden = self.mlp[1](self.mlp[0](self.embedding))  # (P, hidden)
        out, width = self.mlp[2], self.n_kv_heads * self.head_dim
        rows = slice(2 * i * width, 2 * (i + 1) * width)
        kv = F.linear(hidden, out.weight[rows], out.bias[rows])  # (P, 2 * width): keys, then values
        kv = kv.view(self.length, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]


class LayerPrefix(AdapterLayer):
    """The prefixes of one attention layer, for every prefix adapter of the model: installed as
    `Attention.prefix`, called with the batch size, returning the active adapters' keys and values. It wraps no
    base layer (attention without a prefix is the base), cannot be merged, nor routed per row (a prefix changes
    the attention's length for the whole batch)."""

    label = "prefix"
    routable = False

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.prefix_k = nn.ParameterDict()  # plain prefixes: name -> (n_kv_heads, P, head_dim)
        self.prefix_v = nn.ParameterDict()
        # Reparameterized adapters, name -> PrefixEncoder. One encoder serves every layer, so the model owns it
        # (model.prefix_encoder); this plain dict only refers to it, keeping it out of each layer's state dict.
        self.encoders: dict[str, PrefixEncoder] = {}

    @property
    def adapters(self) -> list[str]:
        return [*self.prefix_k.keys(), *self.encoders]

    def remove_adapter(self, name: str) -> None:
        for store in (self.prefix_k, self.prefix_v):
            if name in store:
                del store[name]
        self.encoders.pop(name, None)

    @classmethod
    def remove_from_model(cls, model: nn.Module, name: str) -> None:
        """The reparameterization MLP lives on the model (one for every layer): drop it with its adapter."""
        encoders = getattr(model, ENCODERS, None)
        if encoders is not None and name in encoders:
            del encoders[name]
            if not len(encoders):
                delattr(model, ENCODERS)

    def kv(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's (keys, values) for this layer, each (n_kv_heads, P, head_dim)."""
        if name in self.encoders:
            return self.encoders[name].layer(self.layer)
        return self.prefix_k[name], self.prefix_v[name]

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        pairs = [self.kv(name) for name in self.active if name in self.prefix_k or name in self.encoders]
        if not pairs:
            return None
        k = torch.cat([k for k, _ in pairs], dim=1) if len(pairs) > 1 else pairs[0][0]
        v = torch.cat([v for _, v in pairs], dim=1) if len(pairs) > 1 else pairs[0][1]
        return k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, adapters={self.adapters}, active={list(self.active)}"


# --- the model's prefix layers ------------------------------------------------------------------------
def _attention_layers(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "prefix") for b in blocks):
        raise TypeError(f"prefix tuning needs an lmlab Transformer (attention layers with a `prefix` hook); got "
                        f"{type(model).__name__}")
    return [b.attn for b in blocks]


def prefix_layers(model: nn.Module) -> list[LayerPrefix]:
    """The LayerPrefix of every attention layer that has one, in layer order."""
    _attention_layers(model)  # an lmlab Transformer, or a clear TypeError
    return list(adapters.adapter_layers(model, LayerPrefix).values())


# --- attach -------------------------------------------------------------------------------------------
@torch.no_grad()
def real_token_prefixes(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values (n_kv_heads, len(ids), head_dim) that each token of `ids` (1-D) gets at
    position 0, each token alone: its key through k_proj (and QK-norm), with RoPE at position 0 the identity.
    The active adapters of other kinds (and active prefixes) take part, as they would in a forward pass."""
    attns = _attention_layers(model)
    inputs: list[torch.Tensor] = []
    hooks = [a.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for a in attns]
    try:
        model.hidden_states(ids.view(-1, 1))  # len(ids) one-token sequences
    finally:
        for h in hooks:
            h.remove()
    out = []
    for attn, x in zip(attns, inputs, strict=True):
        k = attn.k_proj(x).view(-1, attn.n_kv_heads, attn.head_dim)
        if attn.k_norm is not None:
            k = attn.k_norm(k)
        v = attn.v_proj(x).view(-1, attn.n_kv_heads, attn.head_dim)
        out.append((k.transpose(0, 1), v.transpose(0, 1)))
    return out


def add_prefix(model: nn.Module, cfg: AdapterConfig, name: str = DEFAULT_NAME) -> None:
    """Attach a fresh prefix adapter `name` (cfg.prefix_len virtual tokens in every attention layer) and make it
    the one active prefix adapter: plain prefixes initialized from real tokens, or, with cfg.prefix_hidden > 0,
    the reparameterization MLP (see the module docstring). `adapters.apply_adapter` calls this, then freezes
    the base."""
    if cfg.method != "prefix":
        raise ValueError(f"add_prefix needs an adapter config with method='prefix', got {cfg.method!r}")
    if cfg.targets:
        raise ValueError(f"prefix tuning adds prefixes to every attention layer and has no targets; remove "
                         f"adapter.targets={cfg.targets}")
    attns = _attention_layers(model)
    adapters.check_new_adapter(model, name)
    foreign = [i for i, a in enumerate(attns) if a.prefix is not None and not isinstance(a.prefix, LayerPrefix)]
    if foreign:
        raise ValueError(f"attention layers {foreign} already carry another prefix hook; remove it first")
    mcfg = model.cfg
    weight = model.embed.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)  # adapters train in at least float32, as LoRA's do
    for i, attn in enumerate(attns):
        if attn.prefix is None:
            attn.prefix = LayerPrefix(i)
    layers = prefix_layers(model)
    if cfg.prefix_hidden > 0:
        encoder = PrefixEncoder(mcfg.n_layers, mcfg.n_kv_heads, mcfg.head_dim, cfg.prefix_len, cfg.prefix_hidden,
                                device=weight.device, dtype=dtype)
        if not isinstance(getattr(model, ENCODERS, None), nn.ModuleDict):
            model.add_module(ENCODERS, nn.ModuleDict())
        getattr(model, ENCODERS)[name] = encoder
        for layer in layers:
            layer.encoders[name] = encoder
    else:
        for layer in layers:  # the new adapter runs alone: the initializing pass must not see older prefixes
            layer.active = ()
        ids = torch.randint(mcfg.vocab_size, (cfg.prefix_len,), device=weight.device)
        for layer, (k, v) in zip(layers, real_token_prefixes(model, ids), strict=True):
            layer.prefix_k[name] = nn.Parameter(k.to(dtype).contiguous())
            layer.prefix_v[name] = nn.Parameter(v.to(dtype).contiguous())
    set_active(model, [name], LayerPrefix)


@torch.no_grad()
def fold_prefix(model: nn.Module, name: str | None = None) -> list[str]:
    """Replace the reparameterization MLP of adapter `name` (default: every reparameterized adapter) by the plain
    prefixes it computes, as the paper does once training ends: the same outputs, no MLP left. Returns the
    folded adapters' names. Save a folded adapter with `prefix_hidden=0` in its config, as it now is plain."""
    encoders = getattr(model, ENCODERS, None)
    names = list(encoders or {}) if name is None else [name]
    for n in names:
        if encoders is None or n not in encoders:
            raise ValueError(f"the model has no reparameterized prefix adapter called {n!r} to fold; it has "
                             f"{list(encoders or {}) or 'none'}")
    layers = prefix_layers(model)
    for n in names:
        encoder = encoders[n]
        trainable = encoder.embedding.requires_grad
        for layer in layers:
            k, v = encoder.layer(layer.layer)
            layer.prefix_k[n] = nn.Parameter(k.detach().clone(), requires_grad=trainable)
            layer.prefix_v[n] = nn.Parameter(v.detach().clone(), requires_grad=trainable)
            del layer.encoders[n]
        del encoders[n]
    if encoders is not None and not len(encoders):
        delattr(model, ENCODERS)
    return names


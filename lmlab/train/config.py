"""`TrainConfig`: everything a training run needs, as dataclasses; a recipe is one TOML file of it.

A recipe (`recipes/NAME.toml`) has one table per section, each a dataclass below:

    [model]        ModelConfig fields (lmlab/model/config.py); vocab_size defaults to the data's
    [data]         DataConfig: the token shards and how they are cut into sequences
    [train]        LoopConfig: steps, batch, learning rate, precision, eval/save cadence, ...
    [optim]        OptimConfig (train/optim.py): which optimizer and its hyperparameters
    [schedule]     ScheduleConfig (train/schedule.py): warmup and decay of the learning rate
    [distributed]  DistributedConfig: how several processes under torchrun share the work

Command-line overrides `--set section.field=value` take TOML values (`--set train.lr=6e-4`,
`--set train.compile=true`, `--set data.path=runs/x/shards`; a value that is not valid TOML is
taken as a string). Unknown sections or fields are errors that name the closest valid field, and
values are checked against the field's type, so a typo never silently trains the wrong thing.
The resolved config is stored in every checkpoint, so a run can be read back and repeated.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.config import ModelConfig
from .optim import OptimConfig
from .schedule import ScheduleConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("auto", "none", "ddp", "fsdp", "tp")


@dataclass
class DataConfig:
    """Where the training tokens come from."""

    path: str = ""  # token shard directory, written by `lmlab data tokenize` or `lmlab data prepare`
    tokenizer: str = ""  # tokenizer directory; copied into checkpoints and used for sample generations
    seq_len: int = 256  # tokens per training sequence
    doc_mask: bool = False  # attend only within each packed document (positions restart per document)
    shuffle: bool = True  # visit the sequences of every epoch in a fresh seeded order


@dataclass
class LoopConfig:
    """The `[train]` section: length, batch, learning rate and everything the loop does per step."""

    out_dir: str = "runs/pretrain"  # checkpoints, metrics.jsonl and plots go here
    steps: int = 1000  # optimizer steps
    lr: float = 3e-4  # peak learning rate (the schedule scales it; Muon's group uses optim.muon_lr)
    batch_size: int = 8  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size x grad_accum x world
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    precision: str = "fp32"  # "fp32" | "bf16" (autocast) | "fp16" (autocast + gradient scaler)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", ...
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    seed: int = 0  # weights initialization and data order
    log_every: int = 10  # steps between metric lines
    eval_every: int = 200  # steps between evaluations (val loss, perplexity, samples); 0: only at the end
    eval_batches: int = 20  # validation batches per evaluation (per process); 0: the whole split
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])  # generated at eval
    sample_tokens: int = 32  # new tokens per sample (greedy); 0 disables samples
    save_every: int = 500  # steps between checkpoints (one is always written at the end); 0: only at the end
    keep_last: int = 2  # checkpoints kept; older ones are deleted once a newer one is complete
    peak_flops: float = 0.0  # peak FLOP/s of one device for MFU; 0: look the GPU up, no MFU on CPU
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    init_from: str = ""  # start from this checkpoint's weights (a new run: fresh optimizer, step 0)


@dataclass
class DistributedConfig:
    """How processes started by torchrun share the model and the batch."""

    strategy: str = "auto"  # "auto" (ddp when several processes, else none) | "none" | "ddp" | "fsdp" | "tp"
    backend: str = "auto"  # "auto" (nccl on cuda, gloo on cpu), "nccl", "gloo"
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (True) or ZeRO-2-like (False) memory/communication trade
    fsdp_reduce_fp32: bool = True  # reduce gradients in float32 even when computing in bf16/fp16


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the setting and the fix for anything the loop cannot run."""
        t, d = self.train, self.data

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid training config: {msg}")

        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            check(getattr(t, name) >= 1, f"train.{name} must be at least 1, got {getattr(t, name)}")
        for name in ("eval_every", "eval_batches", "save_every", "sample_tokens", "threads"):
            check(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
        check(t.keep_last >= 1, f"train.keep_last must be at least 1, got {t.keep_last}")
        check(t.lr > 0, f"train.lr must be positive, got {t.lr}")
        check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}")
        check(t.peak_flops >= 0, f"train.peak_flops must be >= 0, got {t.peak_flops}")
        check(t.precision in PRECISIONS, f"train.precision={t.precision!r}; choose one of {PRECISIONS}")
        check(d.seq_len >= 1, f"data.seq_len must be at least 1, got {d.seq_len}")
        check(d.seq_len <= self.model.max_seq_len,
              f"data.seq_len={d.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; raise "
              "model.max_seq_len or shorten data.seq_len")
        strategy = self.distributed.strategy
        check(strategy in STRATEGIES, f"distributed.strategy={strategy!r}; choose one of {STRATEGIES}")
        check(self.distributed.backend in ("auto", "nccl", "gloo"),
              f"distributed.backend={self.distributed.backend!r}; choose auto, nccl or gloo")

    # --- (de)serialization -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], vocab_size: int | None = None) -> TrainConfig:
        """Build from nested dicts (a parsed recipe). `vocab_size` fills model.vocab_size when the
        recipe leaves it out (the data's vocabulary, see `load_recipe`)."""
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown recipe section(s) {unknown}; the sections are {list(SECTIONS)}")
        parts = {}
        for name, kind in SECTIONS.items():
            values = dict(d.get(name) or {})
            if not isinstance(values, dict):
                raise ValueError(f"recipe section [{name}] must be a table of settings, got {values!r}")
            if name == "model" and values.get("vocab_size") in (None, "auto"):
                if vocab_size is None:
                    raise ValueError("model.vocab_size is not set and there is no data to take it from; set "
                                     "model.vocab_size or data.path (a token shard directory)")
                values["vocab_size"] = vocab_size
            if name == "optim" and "lr" in values:  # one place for the number everyone tunes
                raise ValueError("the peak learning rate is train.lr (optim.muon_lr for Muon's matrices); "
                                 "move optim.lr there")
            parts[name] = _build(kind, values, name)
        return cls(**parts)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": LoopConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "distributed": DistributedConfig}


def _all_keys(sections: dict[str, type] | None = None) -> list[str]:
    """Every settable key, nested tables included (model.moe.n_experts, model.rope_scaling.factor)."""

    def keys(prefix: str, kind: type) -> list[str]:
        out = []
        for name, hint in typing.get_type_hints(kind).items():
            out.append(f"{prefix}.{name}")
            nested = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
            for sub in nested:
                out += keys(f"{prefix}.{name}", sub)
        return out

    return [k for s, kind in (sections or SECTIONS).items() for k in keys(s, kind)]


def _did_you_mean(key: str, sections: dict[str, type] | None = None) -> str:
    leaf = key.rsplit(".", 1)[-1]
    keys = _all_keys(sections)
    # a right field under the wrong section (train.betas -> optim.betas) first, then a typo
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to the field type `hint` where that is lossless (int -> float, list ->
    tuple), else a ValueError naming the setting."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if hint is Any or (origin is None and not isinstance(hint, type)):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} expects a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [_check_type(v, args[min(i, len(args) - 1)], key) for i, v in enumerate(value)] if args else value
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} expects a table, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key} expects a table, got {value!r}")
        return _build(hint, value, key)
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"{key} expects {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(kind: type, values: dict[str, Any], prefix: str, sections: dict[str, type] | None = None) -> Any:
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    for key in values:
        if key not in names:
            raise ValueError(f"unknown setting {prefix}.{key}{_did_you_mean(f'{prefix}.{key}', sections)}")
    checked = {k: _check_type(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    try:
        return kind(**checked)
    except TypeError as e:
        raise ValueError(f"[{prefix}]: {e}") from e


# --- recipes and overrides ---------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """"section.field=value" -> (["section", "field"], value), value read as TOML when it is valid
    TOML and as a plain string otherwise."""
    key, sep, raw = text.partition("=")
    path = [p.strip() for p in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ValueError(f"--set {text!r}: expected section.field=value, e.g. train.lr=6e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def build_sections(kind: type, sections: dict[str, type], d: dict[str, Any], what: str, *,
                   train_defaults: dict[str, Any] | None = None, optional: tuple[str, ...] = ()) -> Any:
    """What every fine-tuning and alignment stage does once its recipe dict `d` has the overrides and the command
    line's choices in it: refuse unknown sections and optim.lr (the peak is train.lr), build and type-check each
    section (train over `train_defaults`; an `optional` section absent or None stays None), and validate."""
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ValueError(f"unknown recipe section(s) {unknown}; {what} recipes have {list(sections)}")
    if "lr" in (d.get("optim") or {}):
        raise ValueError("the peak learning rate is train.lr; move optim.lr there")
    parts: dict[str, Any] = {}
    for name, section in sections.items():
        if name in optional and d.get(name) is None:
            parts[name] = None
            continue
        values = dict(d.get(name) or {})
        if name == "train":
            values = {**(train_defaults or {}), **values}
        parts[name] = _build(section, values, name, sections)
    cfg = kind(**parts)
    cfg.validate()
    return cfg


def apply_overrides(d: dict[str, Any], overrides: list[str], sections: dict[str, type] | None = None) -> dict[str, Any]:
    """The nested dict `d` with each "a.b=value" override set (a deep copy; `d` is unchanged). `sections`: the
    recipe's sections (default: pretraining's)."""
    sections = sections or SECTIONS
    d = json.loads(json.dumps(d))
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in sections:
            raise ValueError(f"--set {text!r}: unknown section {path[0]!r}{_did_you_mean('.'.join(path), sections)}")
        node = d
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text!r}: {part} is not a table")
        node[path[-1]] = value
    return d


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; the recipes that ship with lmlab are in recipes/")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path} is not valid TOML: {e}") from e


def data_vocab_size(shard_dir: str | Path) -> int | None:
    """The vocabulary size the token shards were written with, rounded up to a multiple of 64
    (matrix shapes that are multiples of 64 run faster; the extra rows are never targets)."""
    meta = Path(shard_dir) / "meta.json"
    if not meta.is_file():
        return None
    vocab = int(json.loads(meta.read_text())["vocab_size"])
    return 64 * -(-vocab // 64)


def resolve(d: dict[str, Any], overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a recipe dict and overrides; model.vocab_size comes from the data when unset."""
    d = apply_overrides(d, list(overrides))
    path = (d.get("data") or {}).get("path")
    return TrainConfig.from_dict(d, vocab_size=data_vocab_size(path) if path else None)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML recipe, apply `--set` overrides, and validate the result."""
    return resolve(read_recipe(path), overrides)

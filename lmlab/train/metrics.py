"""What a training run reports: metric lines (JSONL), optional TensorBoard, loss-curve plots, MFU.

`metrics.jsonl` sits beside the checkpoints, one JSON object per line: {"kind": "train", "step",
"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", ...} every `log_every` steps and
{"kind": "eval", "step", "val_loss", "val_ppl", "samples"} at each evaluation. On resume the lines
after the resumed step are dropped first (they belong to the part of the run that is redone), so
the file always reads as one uninterrupted run.

MFU (model FLOPs utilization, PaLM appendix B): achieved training FLOP/s, counted as
`flops_per_token(cfg, seq_len) x tokens/s` (6N plus the attention term, see model/counting.py),
divided by the hardware's peak dense bf16 FLOP/s times the number of devices.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_file

METRICS_FILE = "metrics.jsonl"

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' data sheets; matched as
# substrings of torch.cuda.get_device_name(), most specific first. Set train.peak_flops for others.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM / HBM3
    ("H200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops_of(device_name: str) -> float:
    """Peak bf16 FLOP/s of a device, by name; 0.0 when unknown (then no MFU is shown)."""
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return 0.0


class MetricsLog:
    """Appends metric records to out_dir/metrics.jsonl (and TensorBoard when asked). Only the
    main process writes; the others hold a disabled log."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("train.tensorboard=true needs the tensorboard package: pip install tensorboard"
                                   ) from e
            self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (the redone part of a resumed run), atomically."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        with atomic_file(self.path, "w") as f:
            f.write("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a killed run keeps every line it printed
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill: dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or of the one in a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # only the last line of a killed run can be partial
    return records


def plot_losses(metrics: str | Path, out: str | Path, title: str = "") -> Path | None:
    """Training loss (and validation loss where evaluated) against tokens, as a PNG. Returns the
    path, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(metrics)
    if not (path / METRICS_FILE if path.is_dir() else path).is_file():
        return None  # a checkpoint saved before the first metrics line
    records = read_metrics(metrics)
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
    if not train and not evals:
        return None
    tokens_at = {r["step"]: r.get("tokens", r["step"]) for r in train}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot([r.get("tokens", r["step"]) for r in train], [r["loss"] for r in train], lw=1.2, label="train")
    if evals:
        ax.plot([tokens_at.get(r["step"], r.get("tokens", r["step"])) for r in evals], [r["val_loss"] for r in evals],
                "o-", ms=4, lw=1.2, label="validation")
    ax.set_xlabel("tokens" if train and "tokens" in train[0] else "step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


def plot_metrics(metrics: str | Path, out: str | Path, keys: Sequence[str], title: str = "",
                 extra: Sequence[dict[str, Any]] = ()) -> Path | None:
    """One panel per metric in `keys` against the step: the training log's values as a line, the evaluations'
    as dots (alignment runs: rewards, accuracies, KL). `extra`: more records, e.g. the evaluation before the
    first step ({"kind": "eval", "step": 0, ...}). Keys absent from the log are left out; None when nothing is
    plotted or matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(metrics)
    if not (path / METRICS_FILE if path.is_dir() else path).is_file():
        return None
    records = sorted([*extra, *read_metrics(metrics)], key=lambda r: r.get("step", 0))
    panels = []
    for key in keys:
        train = [(r["step"], r[key]) for r in records if r.get("kind") == "train" and _number(r.get(key))]
        evals = [(r["step"], r[key]) for r in records if r.get("kind") == "eval" and _number(r.get(key))]
        if train or evals:
            panels.append((key, train, evals))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, train, evals) in zip(axes.flat, panels, strict=False):
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], lw=1.2, label="train")
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", ms=4, lw=1.0, label="held out")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if train and evals:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

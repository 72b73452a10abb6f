"""The main job: from nothing to a small trained model and its report card, in minutes on a CPU.

    lmlab speedrun            (make speedrun: installs everything first)

Stages, each in its own directory under --out (default runs/speedrun/), each reused when a rerun
finds it complete (--fresh redoes them all):

    1. synth/      the built-in synthetic corpus (stories, arithmetic with and without worked
                   steps, lookups, copying) and its held-out evaluation sets
    2. tokenizer/  a byte-level BPE trained on the pretraining text
    3. shards/     the pretraining text as token shards with a validation split
    4. pretrain/   a few-million-parameter model trained by recipes/speedrun.toml; interrupted
                   (Ctrl-C), it leaves a checkpoint that the next `lmlab speedrun` resumes
    5. sft         supervised fine-tuning on the synthetic instructions: arrives with the
                   fine-tuning stage; until then the run stops after pretraining and says so
    6. evaluation  validation loss and perplexity, held-out arithmetic with and without worked
                   steps (lmlab/evals/synthetic.py), sample completions
    7. report.md   the report card, with report.json (every number) and loss.png

This module sits beside cli.py because, like it, it knows several stages; it only calls their
public functions.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file

SFT_NOTE = ("SFT on the synthetic instructions arrives with the fine-tuning stage (lmlab sft); this run stops "
            "after pretraining, so the model below is a base model prompted in its pretraining formats.")


def default_recipe() -> Path:
    """recipes/speedrun.toml of this source tree (the package is installed from it)."""
    return Path(__file__).resolve().parents[1] / "recipes" / "speedrun.toml"


@dataclass
class SpeedrunConfig:
    out: Path = Path("runs/speedrun")
    recipe: Path = field(default_factory=default_recipe)
    overrides: list[str] = field(default_factory=list)  # --set for the pretraining recipe
    corpus_size: str = "small"  # synthetic corpus preset (tiny for tests)
    vocab_size: int = 2048
    val_fraction: float = 0.02
    eval_problems: int = 200  # held-out arithmetic problems per task and mode
    fresh: bool = False
    progress: bool = True
    seed: int = 0


class _Stages:
    """Prints each stage as it runs and records its wall time."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name: str, what: str, fn, done: bool = False):
        if done:
            print(f"[{name}] {what}: already complete, reused")
            self.times[name] = 0.0
            return None
        print(f"[{name}] {what} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - start
        print(f"[{name}] done in {self.times[name]:.1f} s", flush=True)
        return result


def speedrun(cfg: SpeedrunConfig) -> dict[str, Any]:
    """Run every stage (see the module docstring); returns the report's numbers."""
    from .data.shards import write_shards
    from .data.synthetic import SynthConfig, generate
    from .evals.synthetic import evaluate_arithmetic
    from .model.checkpoint import load_checkpoint
    from .model.counting import count_params, flops_per_token
    from .tokenizer import Tokenizer, load_tokenizer
    from .train.checkpoint import list_checkpoints
    from .train.config import load_recipe
    from .train.metrics import plot_losses, read_metrics
    from .train.pretrain import pretrain

    out = Path(cfg.out)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    synth, tok_dir, shards, run_dir = out / "synth", out / "tokenizer", out / "shards", out / "pretrain"
    stages = _Stages()
    started = time.perf_counter()

    stages.run("1/7 corpus", f"synthetic corpus ({cfg.corpus_size}) -> {synth}",
               lambda: generate(synth, SynthConfig.from_size(cfg.corpus_size, seed=cfg.seed), progress=cfg.progress),
               done=(synth / "manifest.json").is_file())

    def texts(split: str) -> list[str]:
        return [json.loads(line)["text"] for line in (synth / "pretrain" / f"{split}.jsonl").read_text().splitlines()]

    def train_tokenizer():
        Tokenizer.train(texts("train"), vocab_size=cfg.vocab_size, progress=cfg.progress).save(tok_dir)

    stages.run("2/7 tokenizer", f"byte-level BPE, {cfg.vocab_size} tokens -> {tok_dir}", train_tokenizer,
               done=(tok_dir / "tokenizer.json").is_file())
    tokenizer = load_tokenizer(tok_dir)
    stages.run("3/7 shards", f"token shards -> {shards}",
               lambda: write_shards(texts("train"), tokenizer, shards, val_fraction=cfg.val_fraction,
                                    seed=cfg.seed, progress=cfg.progress),
               done=(shards / "meta.json").is_file())

    overrides = [f"data.path={shards}", f"data.tokenizer={tok_dir}", f"train.out_dir={run_dir}", *cfg.overrides]
    train_cfg = load_recipe(cfg.recipe, overrides)
    finished = [s for s, _ in list_checkpoints(run_dir)]
    complete = bool(finished) and finished[-1] >= train_cfg.train.steps
    n_params = count_params(train_cfg.model)
    result = stages.run(
        "4/7 pretrain", f"{n_params / 1e6:.2f}M-parameter model, {train_cfg.train.steps} steps -> {run_dir}"
        + (" (resuming)" if finished and not complete else ""),
        lambda: pretrain(train_cfg, resume=bool(finished), progress=cfg.progress), done=complete)
    if result is not None and result.interrupted:
        print(f"interrupted: the next `lmlab speedrun` resumes from {result.checkpoint}")
        return {"interrupted": True}
    checkpoint = list_checkpoints(run_dir)[-1][1]

    print(f"[5/7 sft] skipped: {SFT_NOTE}")

    def evaluate():
        model = load_checkpoint(checkpoint).eval()
        with torch.no_grad():
            return evaluate_arithmetic(model, tokenizer, synth / "eval", limit=cfg.eval_problems)

    arith = stages.run("6/7 evaluate", f"held-out arithmetic, {cfg.eval_problems} problems per task and mode",
                       evaluate)
    records = read_metrics(run_dir)
    train_lines = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    tokens = train_lines[-1]["tokens"] if train_lines else 0
    report = {
        "checkpoint": str(checkpoint),
        "model": {"params": n_params, "params_non_embedding": count_params(train_cfg.model, embeddings=False),
                  "d_model": train_cfg.model.d_model, "n_layers": train_cfg.model.n_layers,
                  "n_heads": train_cfg.model.n_heads, "vocab_size": train_cfg.model.vocab_size,
                  "seq_len": train_cfg.data.seq_len},
        "training": {"steps": train_cfg.train.steps, "tokens": tokens,
                     "flops": flops_per_token(train_cfg.model, train_cfg.data.seq_len) * tokens,
                     "final_train_loss": train_lines[-1]["loss"] if train_lines else None,
                     "tokens_per_s": _median([r["tokens_per_s"] for r in train_lines[1:] or train_lines] or [0.0])},
        "eval": {"val_loss": evals[-1]["val_loss"] if evals else None,
                 "val_ppl": evals[-1]["val_ppl"] if evals else None,
                 "samples": evals[-1].get("samples", []) if evals else [],
                 "arithmetic": arith.to_dict()},
        "sft": "not yet: " + SFT_NOTE,
        "stage_seconds": stages.times,
        "total_seconds": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    plot_losses(run_dir, out / "loss.png", title="speedrun: pretraining loss")
    with atomic_file(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    with atomic_file(out / "report.md", "w") as f:
        f.write(report_markdown(report))
    stages.times["7/7 report"] = 0.0
    print(f"[7/7 report] {out / 'report.md'}")
    print(f"\ntry the model:\n  lmlab generate --model {checkpoint} --prompt 'Once upon a time' --temperature 0.7\n"
          f"  lmlab generate --model {checkpoint} --prompt $'Add 385 and 47.\\n' --temperature 0")
    return report


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def report_markdown(r: dict[str, Any]) -> str:
    m, t, e = r["model"], r["training"], r["eval"]
    acc = e["arithmetic"]["accuracy"]
    counts = e["arithmetic"]["counts"]
    lines = [
        "# lmlab speedrun: report card", "",
        f"Checkpoint: `{r['checkpoint']}`  ", f"Total time: {r['total_seconds'] / 60:.1f} min "
        f"({r['machine']['processor']}, {r['machine']['threads']} threads, torch {r['machine']['torch']})", "",
        "## Model and training", "",
        "| | |", "|---|---|",
        f"| parameters | {m['params']:,} ({m['params_non_embedding']:,} without embeddings) |",
        f"| shape | d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, "
        f"vocab {m['vocab_size']:,}, context {m['seq_len']} |",
        f"| training | {t['steps']:,} steps, {t['tokens']:,} tokens, {t['flops']:.2e} FLOPs |",
        f"| throughput | {t['tokens_per_s']:,.0f} tokens/s (median) |",
        f"| final train loss | {_fmt(t['final_train_loss'])} |",
        f"| validation loss / perplexity | {_fmt(e['val_loss'])} / {_fmt(e['val_ppl'], 2)} |", "",
        "![loss](loss.png)", "",
        "## Held-out arithmetic (greedy, exact answer)", "",
        "| task | problems | with worked steps | direct answer |", "|---|---:|---:|---:|",
        *[f"| {task} | {counts[task]} | {100 * acc['worked'][task]:.1f}% | {100 * acc['direct'][task]:.1f}% |"
          for task in counts],
        f"| **mean** | | **{100 * e['arithmetic']['mean']['worked']:.1f}%** | "
        f"**{100 * e['arithmetic']['mean']['direct']:.1f}%** |", "",
        "Worked: prompted with the first line of a worked solution (\"Add 385 and 47.\"), scored on its "
        "`Answer:` line. Direct: prompted \"385 + 47 =\", scored on the first number.", "",
        "## Samples", "",
        *[f"```\n{s}\n```" for s in e["samples"]],
        *[f"```\n{x['prompt']}{x['completion']}\n```  {'correct' if x['correct'] else 'wrong'} "
          f"({x['task']}, {x['mode']})" for x in e["arithmetic"]["examples"][:6]], "",
        "## Stages", "",
        "| stage | seconds |", "|---|---:|",
        *[f"| {name} | {sec:.1f} |" for name, sec in r["stage_seconds"].items()], "",
        f"Fine-tuning: {r['sft']}", "",
    ]
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"

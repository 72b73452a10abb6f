"""The main job: from nothing to a small trained model and its report card, in minutes on a CPU.

    lmlab speedrun            (make speedrun: installs everything first)

Stages, each writing under --out (default runs/speedrun/):

    1. synth/      the built-in synthetic corpus (stories, arithmetic with and without worked
                   steps, lookups, copying) and its held-out evaluation sets
    2. tokenizer/  a byte-level BPE trained on the pretraining text, numbers split into single
                   digits (as Llama and DeepSeek do): a column-by-column solution then reads
                   each digit from its own token instead of from inside "250"
    3. shards/     the pretraining text as token shards with a validation split
    4. pretrain/   a few-million-parameter model trained by recipes/speedrun.toml
    5. sft         supervised fine-tuning of the pretrained model on the synthetic chats
                   (recipes/sft-speedrun.toml): it learns to answer in the chat format
    6. eval.json   validation loss and bits per byte, held-out arithmetic with and without
                   worked steps and held-out lookups, copying and story questions, each asked in
                   the pretraining text's own format (lmlab/evals/synthetic.py), sample completions
    7. report.md   the report card, with report.json (every number) and loss.png

Reruns: every stage records a fingerprint of its inputs (its settings and the fingerprints of the
stages before it) in stages.json. A stage whose fingerprint matches and whose output is complete
is reused; one whose inputs changed is redone, and so is everything after it. Ctrl-C during
pretraining leaves a checkpoint, and the next `lmlab speedrun` resumes it exactly. `--fresh`
deletes --out and redoes everything.

This module sits beside cli.py because, like it, it knows several stages; it only calls their
public functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file
from .tokenizer.bpe import GPT4_PATTERN

# GPT-4's pre-tokenizer with every digit its own piece (instead of runs of up to three), so that
# no merge ever spans two digits.
DIGITS_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
TOKENIZER_PATTERNS = {"digits": DIGITS_PATTERN, "gpt4": GPT4_PATTERN}
STAGES_FILE = "stages.json"
N_STAGES = 7


def default_recipe(name: str = "speedrun.toml") -> Path:
    """recipes/<name> of this source tree (the package is installed from it)."""
    return Path(__file__).resolve().parents[1] / "recipes" / name


@dataclass
class SpeedrunConfig:
    """What `speedrun` builds; every field is also a `lmlab speedrun` option."""

    out: Path = Path("runs/speedrun")
    recipe: Path = field(default_factory=default_recipe)
    overrides: list[str] = field(default_factory=list)  # --set section.field=value for the pretraining recipe
    sft_recipe: Path = field(default_factory=lambda: default_recipe("sft-speedrun.toml"))
    sft_overrides: list[str] = field(default_factory=list)  # --sft-set for the fine-tuning recipe
    corpus_size: str = "small"  # synthetic corpus preset: tiny (tests), small, medium
    vocab_size: int = 2048
    tokenizer_pattern: str = "digits"  # a key of TOKENIZER_PATTERNS
    val_fraction: float = 0.02  # of the pretraining documents, held out for validation loss
    eval_problems: int = 200  # held-out problems per task (and per mode for arithmetic)
    chat_problems: int = 50  # held-out problems per task asked as a chat, before and after SFT
    fresh: bool = False  # delete `out` first and redo every stage
    progress: bool = True
    seed: int = 0  # corpus, shard split

    def __post_init__(self) -> None:
        self.out, self.recipe, self.sft_recipe = Path(self.out), Path(self.recipe), Path(self.sft_recipe)
        if self.tokenizer_pattern not in TOKENIZER_PATTERNS:
            raise ValueError(f"tokenizer_pattern={self.tokenizer_pattern!r}; choose one of "
                             f"{', '.join(TOKENIZER_PATTERNS)}")
        if self.eval_problems < 1 or self.chat_problems < 1:
            raise ValueError(f"eval_problems and chat_problems must be at least 1, got {self.eval_problems} and "
                             f"{self.chat_problems}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Runs the stages in order: prints what each does and how long it took, reuses the ones whose
    inputs are unchanged and whose output is complete, and records both in stages.json."""

    def __init__(self, out: Path):
        self.out = out
        path = out / STAGES_FILE
        self.record: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
        self.ran: dict[str, bool] = {}  # this run: stage -> whether it did work (False: reused)
        self.upstream_redone = False

    def run(self, index: int, name: str, what: str, key: str, outputs: list[Path], complete: Callable[[], bool],
            work: Callable[[bool], Any]) -> Any:
        """Stage `index`: reuse it, or call work(resuming) where resuming says that an unfinished
        output of the same inputs is there to continue (pretraining's checkpoints)."""
        label = f"[{index}/{N_STAGES} {name}]"
        same = self.record.get(name, {}).get("key") == key and not self.upstream_redone
        if same and complete():
            print(f"{label} {what}: complete, reused (took {self.record[name]['seconds']:.1f} s)", flush=True)
            self.ran[name] = False
            return None
        if not same:
            stale = [p for p in outputs if p.exists()]
            if stale:
                print(f"{label} its inputs changed since the last run: deleting {', '.join(map(str, stale))}")
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        resuming = same and any(p.exists() for p in outputs)
        before = self.record[name]["seconds"] if resuming else 0.0  # a resumed stage's time adds up
        self.record[name] = {"key": key, "seconds": before, "complete": False}
        self._save()
        print(f"{label} {what}" + (" (resuming)" if resuming else "") + " ...", flush=True)
        start = time.perf_counter()
        try:
            return work(resuming)
        finally:
            self.record[name]["seconds"] = before + time.perf_counter() - start
            self.record[name]["complete"] = complete()
            self._save()
            self.ran[name] = True
            self.upstream_redone = True
            status = "done" if self.record[name]["complete"] else "stopped"
            print(f"{label} {status} in {time.perf_counter() - start:.1f} s", flush=True)

    def seconds(self) -> dict[str, float]:
        return {name: r["seconds"] for name, r in self.record.items()}

    def _save(self) -> None:
        with atomic_file(self.out / STAGES_FILE, "w") as f:
            json.dump(self.record, f, indent=2)


def speedrun(cfg: SpeedrunConfig) -> dict[str, Any]:
    """Run every stage (see the module docstring); returns the report's numbers, or
    {"interrupted": True, "checkpoint": ...} when pretraining was stopped by a signal."""
    from .data.shards import write_shards
    from .data.synthetic import SynthConfig, generate, is_current
    from .tokenizer import Tokenizer, load_tokenizer
    from .train.checkpoint import list_checkpoints
    from .train.config import load_recipe
    from .train.pretrain import pretrain
    from .tune.sft import FORGETTING_FILE, finetune, load_finetune_recipe

    out = cfg.out
    # Check the recipe and --set overrides now rather than after three stages (the data, which
    # sets the vocabulary, does not exist yet: the tokenizer's size stands in for it).
    load_recipe(cfg.recipe, [f"model.vocab_size={cfg.vocab_size}", *cfg.overrides])
    sft_settings = ["train.out_dir='sft'", *cfg.sft_overrides]
    load_finetune_recipe(cfg.sft_recipe, sft_settings, model="base", data="chats.jsonl")
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    synth, tok_dir, shards, run_dir = out / "synth", out / "tokenizer", out / "shards", out / "pretrain"
    stages = _Stages(out)

    synth_cfg = SynthConfig.from_size(cfg.corpus_size, seed=cfg.seed)
    key = _fingerprint("corpus", synth_cfg.to_dict())
    stages.run(1, "corpus", f"synthetic corpus ({cfg.corpus_size}) -> {synth}", key, [synth],
               lambda: is_current(synth, synth_cfg),
               lambda _: generate(synth, synth_cfg, overwrite=True, progress=cfg.progress))

    def texts() -> list[str]:
        lines = (synth / "pretrain" / "train.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines]

    def train_tokenizer(_: bool) -> None:
        tokenizer = Tokenizer.train(texts(), vocab_size=cfg.vocab_size,
                                    pattern=TOKENIZER_PATTERNS[cfg.tokenizer_pattern], progress=cfg.progress)
        tokenizer.save(tok_dir, overwrite=True)

    key = _fingerprint("tokenizer", key, cfg.vocab_size, TOKENIZER_PATTERNS[cfg.tokenizer_pattern])
    stages.run(2, "tokenizer", f"byte-level BPE, {cfg.vocab_size:,} tokens, {cfg.tokenizer_pattern} pattern "
               f"-> {tok_dir}", key, [tok_dir], lambda: (tok_dir / "tokenizer.json").is_file(), train_tokenizer)
    tokenizer = load_tokenizer(tok_dir)

    key = _fingerprint("shards", key, cfg.val_fraction, cfg.seed)
    stages.run(3, "shards", f"token shards, {cfg.val_fraction:.0%} of documents for validation -> {shards}", key,
               [shards], lambda: (shards / "meta.json").is_file(),
               lambda _: write_shards(texts(), tokenizer, shards, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                      overwrite=True, progress=cfg.progress))

    train_cfg = load_recipe(cfg.recipe, [f"data.path={shards}", f"data.tokenizer={tok_dir}",
                                         f"train.out_dir={run_dir}", *cfg.overrides])
    from .model.counting import count_params

    recipe = train_cfg.to_dict()
    for section, name in (("data", "path"), ("data", "tokenizer"), ("train", "out_dir")):
        del recipe[section][name]  # where the inputs are is not what they are: their keys say that
    key = _fingerprint("pretrain", key, recipe)

    def finished() -> bool:
        found = list_checkpoints(run_dir)
        return bool(found) and found[-1][0] >= train_cfg.train.steps

    def train(resuming: bool):
        resume = resuming and bool(list_checkpoints(run_dir))
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # metrics of a run killed before its first checkpoint
        return pretrain(train_cfg, resume=resume, progress=cfg.progress)

    result = stages.run(4, "pretrain", f"{count_params(train_cfg.model) / 1e6:.2f}M-parameter model, "
                        f"{train_cfg.train.steps:,} steps -> {run_dir}", key, [run_dir], finished, train)
    if result is not None and result.interrupted:
        print(f"interrupted at step {result.step}: run `lmlab speedrun` again (same options) to resume from "
              f"{result.checkpoint}")
        return {"interrupted": True, "checkpoint": str(result.checkpoint)}
    checkpoint = list_checkpoints(run_dir)[-1][1]

    # ---- 5. SFT ------------------------------------------------------------------------------
    sft_dir = out / "sft"
    sft_cfg = load_finetune_recipe(
        cfg.sft_recipe, [f"train.out_dir='{sft_dir}'", f"data.validation='{synth / 'sft' / 'val.jsonl'}'",
                         *cfg.sft_overrides], model=str(checkpoint), data=str(synth / "sft" / "train.jsonl"))
    recipe = sft_cfg.to_dict()
    for section, name in (("model", "path"), ("data", "train"), ("data", "validation"), ("train", "out_dir")):
        del recipe[section][name]
    key = _fingerprint("sft", key, recipe)

    def sft_finished() -> bool:
        f = sft_dir / FORGETTING_FILE
        return f.is_file() and "after" in json.loads(f.read_text()) and bool(list_checkpoints(sft_dir))

    def tune(resuming: bool):
        resume = resuming and bool(list_checkpoints(sft_dir))
        if not resume and sft_dir.exists():
            shutil.rmtree(sft_dir)
        return finetune(sft_cfg, resume=resume, progress=cfg.progress, log=lambda line: print(f"  {line}"))

    length = f"{sft_cfg.data.epochs:g} epochs" if sft_cfg.data.epochs else f"{sft_cfg.train.steps:,} steps"
    result = stages.run(5, "sft", f"{sft_cfg.method} fine-tuning on {synth / 'sft' / 'train.jsonl'} ({length}) "
                        f"-> {sft_dir}", key, [sft_dir], sft_finished, tune)
    if result is not None and result.run.interrupted:
        print(f"interrupted at step {result.run.step}: run `lmlab speedrun` again (same options) to resume from "
              f"{result.run.checkpoint}")
        return {"interrupted": True, "checkpoint": str(result.run.checkpoint)}
    tuned = list_checkpoints(sft_dir)[-1][1]

    key = _fingerprint("eval", key, cfg.eval_problems, cfg.chat_problems, EVAL_VERSION)
    eval_file = out / "eval.json"

    def run_eval(_: bool) -> None:
        numbers = evaluate(checkpoint, train_cfg, tokenizer, synth / "eval", shards, cfg.eval_problems,
                           progress=cfg.progress)
        numbers["chat"] = evaluate_chat_before_after(checkpoint, tuned, tokenizer, synth / "eval",
                                                     cfg.chat_problems, train_cfg.train.device, cfg.progress)
        with atomic_file(eval_file, "w") as f:
            json.dump(numbers, f, indent=2)

    stages.run(6, "evaluate", f"validation loss; held-out arithmetic, lookups, copying and story questions "
               f"({cfg.eval_problems} problems each); the chat tasks before and after SFT ({cfg.chat_problems} "
               "each)", key, [eval_file], eval_file.is_file, run_eval)

    report = build_report(cfg, train_cfg, checkpoint, json.loads(eval_file.read_text()), stages.seconds(),
                          run_dir, shards)
    report["sft"] = sft_summary(sft_dir, tuned, sft_cfg, json.loads(eval_file.read_text())["chat"])
    report["commands"] = [f"lmlab generate --model {tuned} --chat --prompt 'Add 385 and 47.' --temperature 0",
                          f"lmlab generate --model {tuned} --chat --prompt 'Write a story about a fox.' "
                          "--temperature 0.7", *report["commands"]]
    from .train.metrics import plot_losses

    plot_losses(run_dir, out / "loss.png", title="speedrun: pretraining loss")
    with atomic_file(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    with atomic_file(out / "report.md", "w") as f:
        f.write(report_markdown(report))
    print(f"[7/{N_STAGES} report] {out / 'report.md'} (with report.json and loss.png)")
    print(_headline(report))
    print("\ntry the models (the fine-tuned one answers chats; the base continues text in the corpus's formats):")
    for command in report["commands"]:
        print(f"  {command}")
    return report


# --- evaluation -------------------------------------------------------------------------------------

EVAL_VERSION = 3  # bump when what `evaluate` measures changes, so a rerun measures again


def evaluate(checkpoint: Path, train_cfg, tokenizer, eval_dir: Path, shard_dir: Path, limit: int, *,
             progress: bool = True) -> dict[str, Any]:
    """Every number of the report card that needs the model: validation loss over the whole
    validation split, bits per byte, held-out task accuracies and sample completions."""
    from .data.shards import TokenShards
    from .evals.synthetic import complete, evaluate_arithmetic, evaluate_qa
    from .model.checkpoint import load_checkpoint
    from .train.distributed import DistEnv, pick_device
    from .train.pretrain import validation_loss

    device = pick_device(train_cfg.train.device)
    model = load_checkpoint(checkpoint, device=device, dtype=torch.float32).eval()
    shards = TokenShards(shard_dir)
    # What precedes the first token of every document in the packed shards: the previous
    # document's end (and this one's beginning, when the shards have one).
    separator = [i for i in (shards.meta["separator"]["eos_id"], shards.meta["separator"]["bos_id"]) if i is not None]
    ask = dict(prefix_ids=separator, stop_token_ids=list(tokenizer.eos_ids), progress=progress)
    with torch.no_grad():
        val_loss = validation_loss(model, train_cfg, DistEnv(device=device))
        arithmetic = evaluate_arithmetic(model, tokenizer, eval_dir, limit=limit, **ask)
        qa = evaluate_qa(model, tokenizer, eval_dir, limit=limit, max_prompt_tokens=model.cfg.max_seq_len - 16, **ask)
        prompts = list(train_cfg.train.sample_prompts)
        samples = complete(model, tokenizer, prompts, 64, **ask)
    val_bytes = sum(len(tokenizer.decode_bytes(doc.tolist(), skip_special_tokens=True))
                    for doc in shards.documents("val"))
    val_tokens = shards.num_tokens("val")
    return {
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
        "val_bits_per_byte": val_loss / math.log(2) * val_tokens / max(val_bytes, 1),
        "val_tokens": val_tokens, "val_bytes": val_bytes,
        "arithmetic": [r.to_dict() for r in arithmetic], "qa": [r.to_dict() for r in qa],
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts, samples, strict=True)],
    }


def evaluate_chat_before_after(base: Path, tuned: Path, tokenizer, eval_dir: Path, limit: int, device: str,
                               progress: bool) -> dict[str, Any]:
    """The held-out tasks asked as chats, to the base model and to the fine-tuned one."""
    from .evals.synthetic import evaluate_chat
    from .model.checkpoint import load_checkpoint
    from .train.distributed import pick_device

    out = {}
    for name, path in (("before", base), ("after", tuned)):
        model = load_checkpoint(path, device=pick_device(device), dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = [r.to_dict() for r in evaluate_chat(model, tokenizer, eval_dir, limit=limit,
                                                            max_new_tokens=160, progress=progress)]
    return out


def sft_summary(sft_dir: Path, tuned: Path, sft_cfg, chat: dict[str, Any]) -> dict[str, Any]:
    """report.json's "sft": the run, its held-out loss, forgetting, and chat accuracy before and after."""
    from .train.metrics import read_metrics
    from .tune.sft import FORGETTING_FILE

    records = read_metrics(sft_dir)
    train_lines = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
    mean = {k: sum(r["accuracy"] for r in rows) / max(len(rows), 1) for k, rows in chat.items()}
    return {"checkpoint": str(tuned), "steps": train_lines[-1]["step"] if train_lines else 0,
            "epochs": sft_cfg.data.epochs, "lr": sft_cfg.train.lr,
            "final_train_loss": train_lines[-1]["loss"] if train_lines else None,
            "held_out_loss": evals[-1]["val_loss"] if evals else None,
            "forgetting": json.loads((sft_dir / FORGETTING_FILE).read_text()),
            "chat_accuracy": {k: {r["task"]: r["accuracy"] for r in rows} for k, rows in chat.items()},
            "chat_mean_accuracy": mean, "chat_tasks": chat}


# --- the report card ------------------------------------------------------------------------------

def build_report(cfg: SpeedrunConfig, train_cfg, checkpoint: Path, ev: dict[str, Any], seconds: dict[str, float],
                 run_dir: Path, shard_dir: Path) -> dict[str, Any]:
    """report.json: every number of the run, with where it came from."""
    from .data.shards import TokenShards
    from .model.counting import count_params, flops_per_token
    from .train.distributed import pick_device
    from .train.metrics import read_metrics

    records = read_metrics(run_dir)
    train_lines = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
    tokens = train_lines[-1]["tokens"] if train_lines else 0
    shards = TokenShards(shard_dir)
    m, t = train_cfg.model, train_cfg.train
    speeds = [r["tokens_per_s"] for r in train_lines[1:] or train_lines]
    by_mode = _by_mode(ev["arithmetic"] + ev["qa"])
    return {
        "checkpoint": str(checkpoint),
        "corpus": {"size": cfg.corpus_size, "train_tokens": shards.num_tokens("train"),
                   "val_tokens": shards.num_tokens("val"), "train_documents": shards.num_documents("train"),
                   "tokenizer_vocab": cfg.vocab_size, "tokenizer_pattern": cfg.tokenizer_pattern},
        "model": {"params": count_params(m), "params_non_embedding": count_params(m, embeddings=False),
                  "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
                  "d_ff": m.d_ff, "vocab_size": m.vocab_size, "seq_len": train_cfg.data.seq_len},
        "training": {"steps": t.steps, "batch_tokens": t.batch_size * t.grad_accum * train_cfg.data.seq_len,
                     "tokens": tokens, "epochs": tokens / max(shards.num_tokens("train"), 1),
                     "flops": flops_per_token(m, train_cfg.data.seq_len) * tokens, "lr": t.lr,
                     "optimizer": train_cfg.optim.name, "schedule": train_cfg.schedule.name,
                     "final_train_loss": train_lines[-1]["loss"] if train_lines else None,
                     "tokens_per_s": _median(speeds) if speeds else None,
                     "val_loss_curve": [{"step": r["step"], "val_loss": r["val_loss"]} for r in evals]},
        "eval": {**{k: ev[k] for k in ("val_loss", "val_ppl", "val_bits_per_byte", "val_tokens", "val_bytes")},
                 "accuracy": {mode: {r["task"]: r["accuracy"] for r in rows} for mode, rows in by_mode.items()},
                 "mean_accuracy": {mode: sum(r["accuracy"] for r in rows) / len(rows)
                                   for mode, rows in by_mode.items()},
                 "tasks": ev["arithmetic"] + ev["qa"], "samples": ev["samples"]},
        "stage_seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(pick_device(train_cfg.train.device))},
        "config": {"speedrun": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                   "recipe": train_cfg.to_dict()},
        "commands": [f"lmlab generate --model {checkpoint} --prompt 'Once upon a time' --temperature 0.7",
                     f"lmlab generate --model {checkpoint} --prompt $'Add 385 and 47.\\n' --temperature 0"],
    }


def _cpu_name() -> str:
    """The CPU model where the OS says it (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _by_mode(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(r["mode"], []).append(r)
    return grouped


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _headline(r: dict[str, Any]) -> str:
    e, acc = r["eval"], r["eval"]["mean_accuracy"]
    chat = r.get("sft", {}).get("chat_mean_accuracy", {})
    return (f"val loss {_fmt(e['val_loss'])} ({_fmt(e['val_bits_per_byte'])} bits/byte); arithmetic "
            f"{_pct(acc.get('worked', 0))} with worked steps, {_pct(acc.get('direct', 0))} direct; lookups/copying/"
            f"story questions {_pct(acc.get('qa', 0))}; chat tasks {_pct(chat.get('before', 0))} before SFT, "
            f"{_pct(chat.get('after', 0))} after; {r['total_seconds'] / 60:.1f} min in all")


def report_markdown(r: dict[str, Any]) -> str:
    """report.md: the report card a person reads."""
    c, m, t, e = r["corpus"], r["model"], r["training"], r["eval"]
    acc, tasks = e["accuracy"], {(x["task"], x["mode"]): x for x in e["tasks"]}
    arith = [task for task in ("add", "sub", "mul") if (task, "worked") in tasks or (task, "direct") in tasks]

    def cell(task: str, mode: str) -> str:
        x = tasks.get((task, mode))
        return "" if x is None else f"{_pct(x['accuracy'])} ({x['correct']}/{x['n']})"

    lines = [
        "# lmlab speedrun: report card", "",
        f"{_headline(r)}.", "",
        f"Checkpoint: `{r['checkpoint']}`  ",
        f"Machine: {r['machine']['processor']}, torch {r['machine']['torch']} with {r['machine']['threads']} "
        f"CPU thread(s), device {r['machine']['device']}", "",
        "## Model and training", "",
        "| | |", "|---|---|",
        f"| corpus | synthetic ({c['size']}): {c['train_tokens']:,} training tokens in {c['train_documents']:,} "
        f"documents, {c['val_tokens']:,} validation tokens |",
        f"| tokenizer | byte-level BPE, {c['tokenizer_vocab']:,} tokens, {c['tokenizer_pattern']} pre-tokenizer |",
        f"| parameters | {m['params']:,} ({m['params_non_embedding']:,} without embeddings) |",
        f"| shape | d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads ({m['n_kv_heads']} KV), "
        f"d_ff {m['d_ff']}, vocab {m['vocab_size']:,}, context {m['seq_len']} |",
        f"| training | {t['steps']:,} steps of {t['batch_tokens']:,} tokens: {t['tokens']:,} tokens "
        f"({t['epochs']:.2f} epochs), {t['flops']:.2e} FLOPs, {t['optimizer']} at lr {t['lr']:g}, "
        f"{t['schedule']} schedule |",
        f"| throughput | {t['tokens_per_s'] or 0:,.0f} tokens/s (median over the run) |",
        f"| final train loss | {_fmt(t['final_train_loss'])} |",
        f"| validation | loss {_fmt(e['val_loss'])}, perplexity {_fmt(e['val_ppl'], 2)}, "
        f"{_fmt(e['val_bits_per_byte'])} bits per byte ({e['val_tokens']:,} tokens) |", "",
        "![loss](loss.png)", "",
        "## Held-out arithmetic", "",
        "Greedy, exact answer; problems the corpus held out of every training file. *Worked*: prompted with "
        "the first line of a worked solution (\"Add 385 and 47.\"), scored on its `Answer:` line. *Direct*: "
        "prompted \"385 + 47 =\", scored on the rest of the line.", "",
        "| task | with worked steps | direct answer |", "|---|---:|---:|",
        *[f"| {task} | {cell(task, 'worked')} | {cell(task, 'direct')} |" for task in arith],
        f"| **mean** | **{_pct(e['mean_accuracy'].get('worked', 0))}** | "
        f"**{_pct(e['mean_accuracy'].get('direct', 0))}** |", "",
    ]
    if "qa" in acc:
        lines += ["## Other held-out tasks", "",
                  "Prompted as the pretraining text asks them (`<question>\\nAnswer:`), scored on the rest of the "
                  "line.", "",
                  "| task | accuracy |", "|---|---:|",
                  *[f"| {task} | {cell(task, 'qa')} |" for task in acc["qa"]], ""]
    lines += ["## Samples", "", "Greedy continuations of the recipe's sample prompts and of the first held-out "
              "problem of each arithmetic task.", ""]
    for s in e["samples"]:
        lines += [f"Prompt {s['prompt']!r}:", "", "```", s["prompt"] + s["completion"], "```", ""]
    for x in e["tasks"]:
        if x["mode"] in ("worked", "direct") and x["examples"]:
            ex = x["examples"][0]
            lines += [f"{x['task']}, {x['mode']} ({'right' if ex['correct'] else 'wrong'}):", "",
                      "```", ex["prompt"] + ex["completion"], "```", ""]
    if "sft" in r:
        s = r["sft"]
        chat = {(x["task"], when): x for when, rows in s["chat_tasks"].items() for x in rows}
        f = s["forgetting"]
        lines += ["## After supervised fine-tuning", "",
                  f"`{s['checkpoint']}`: {s['steps']:,} steps ({s['epochs']:g} epochs) of full fine-tuning on the "
                  f"synthetic chats at lr {s['lr']:g}; final train loss {_fmt(s['final_train_loss'])}, held-out "
                  f"chat loss {_fmt(s['held_out_loss'])}.", "",
                  "Each held-out problem is the user's message in the chat template; the reply runs to the end of "
                  "the turn and is checked by the corpus's verifier. *Ended its turn*: the reply closed with the "
                  "template's end-of-turn token (it kept to the chat format; the base model stops at an end of "
                  "document instead, if at all), right or wrong.", "",
                  "| task | base model: right | ended its turn | after SFT: right | ended its turn |",
                  "|---|---:|---:|---:|---:|",
                  *[f"| {task} | {_pct(chat[(task, 'before')]['accuracy'])} | "
                    f"{_pct(chat[(task, 'before')]['answered'] / max(chat[(task, 'before')]['n'], 1))} | "
                    f"{_pct(chat[(task, 'after')]['accuracy'])} ({chat[(task, 'after')]['correct']}/"
                    f"{chat[(task, 'after')]['n']}) | "
                    f"{_pct(chat[(task, 'after')]['answered'] / max(chat[(task, 'after')]['n'], 1))} |"
                    for task in s["chat_accuracy"]["after"]],
                  f"| **mean** | **{_pct(s['chat_mean_accuracy']['before'])}** | | "
                  f"**{_pct(s['chat_mean_accuracy']['after'])}** | |", ""]
        if "after" in f:
            lines += [f"Forgetting: pretraining validation loss {_fmt(f['before'])} before, {_fmt(f['after'])} after "
                      f"({f['change']:+.3f}).", ""]
        for x in s["chat_tasks"]["after"][:3]:
            if x["examples"]:
                ex = x["examples"][0]
                lines += [f"{x['task']} ({'right' if ex['correct'] else 'wrong'}):", "", "```",
                          f"user: {ex['prompt']}", f"assistant: {ex['completion']}", "```", ""]
    lines += ["## Time", "", "| stage | seconds |", "|---|---:|",
              *[f"| {name} | {sec:.1f} |" for name, sec in r["stage_seconds"].items()],
              f"| **total** | **{r['total_seconds']:.1f}** |", "",
              "## Try it", "", "```", *r["commands"], "```", ""]
    return "\n".join(lines)


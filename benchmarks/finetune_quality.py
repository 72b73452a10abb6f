"""What fine-tuning buys on the synthetic chat tasks, measured in one run (the numbers of docs/finetuning.md).

Given the speedrun's base model and corpus (`make speedrun` writes both under runs/speedrun/):

1. SFT: the base model asked the held-out problems as chats, then the same model after full fine-tuning
   (recipes/sft-speedrun.toml) and after LoRA on the same recipe (rank 4 on every projection, under 5% of the
   parameters): accuracy per task, held-out chat loss, trainable parameters, forgetting.
2. Distillation: a smaller student pretrained on the same corpus, fine-tuned on the chats alone, against the
   same student distilled from the fully fine-tuned model (token-level forward KL mixed with the data loss).

    python benchmarks/finetune_quality.py --speedrun runs/speedrun --out runs/finetune-quality

Every run writes its own directory under --out; a finished one is reused when the script is run again
(--fresh redoes them). Prints a markdown table and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lmlab.evals.synthetic import evaluate_chat
from lmlab.model import load
from lmlab.tokenizer import load_tokenizer
from lmlab.train.checkpoint import list_checkpoints
from lmlab.train.metrics import read_metrics
from lmlab.tune.sft import FORGETTING_FILE, finetune, load_finetune_recipe

REPO = Path(__file__).resolve().parents[1]
STUDENT = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=192"]


def _done(run: Path) -> bool:
    f = run / FORGETTING_FILE
    return f.is_file() and bool(list_checkpoints(run))


def sft_run(name: str, base: Path, synth: Path, out: Path, sets: list[str], adapter: str | None = None,
            objective_factory=None) -> dict:
    run = out / name
    cfg = load_finetune_recipe(REPO / "recipes" / "sft-speedrun.toml",
                               [f"train.out_dir='{run}'", f"data.validation='{synth / 'sft' / 'val.jsonl'}'", *sets],
                               model=str(base), data=str(synth / "sft" / "train.jsonl"), adapter=adapter)
    if not _done(run):
        shutil.rmtree(run, ignore_errors=True)
        result = finetune(cfg, objective_factory=objective_factory(cfg) if objective_factory else None,
                          progress=True, log=print)
        params = result.params
    else:
        params = json.loads((run / "params.json").read_text())
    (run / "params.json").write_text(json.dumps(params))
    evals = [r for r in read_metrics(run) if r.get("kind") == "eval" and "val_loss" in r]
    return {"run": str(run), "checkpoint": str(list_checkpoints(run)[-1][1]), "params": params,
            "held_out_loss": evals[-1]["val_loss"], "forgetting": json.loads((run / FORGETTING_FILE).read_text()),
            "adapter": adapter}


def chat_accuracy(base: Path, checkpoint: Path | None, synth: Path, limit: int) -> dict:
    model = load(base).eval()
    if checkpoint is not None and (checkpoint / "adapter_config.json").is_file():
        from lmlab.tune.adapters import load_adapter

        load_adapter(model, checkpoint)
        model.eval()
    elif checkpoint is not None:
        model = load(checkpoint).eval()
    with torch.no_grad():
        results = evaluate_chat(model, load_tokenizer(base), synth / "eval", limit=limit, max_new_tokens=160,
                                progress=True)
    acc = {r.task: r.accuracy for r in results}
    ended = sum(r.answered for r in results) / max(sum(r.n for r in results), 1)
    return {"accuracy": acc, "mean": sum(acc.values()) / len(acc), "ended_turn": ended}


def pretrain_student(speedrun: Path, out: Path, steps: int) -> Path:
    from lmlab.speedrun import default_recipe
    from lmlab.train.config import load_recipe
    from lmlab.train.pretrain import pretrain

    run = out / "student-pretrain"
    found = list_checkpoints(run)
    if found and found[-1][0] >= steps:
        return found[-1][1]
    cfg = load_recipe(default_recipe(), [f"data.path='{speedrun / 'shards'}'",
                                         f"data.tokenizer='{speedrun / 'tokenizer'}'", f"train.out_dir='{run}'",
                                         f"train.steps={steps}", *STUDENT])
    return pretrain(cfg, overwrite=True).checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speedrun", type=Path, default=Path("runs/speedrun"), help="a finished `lmlab speedrun` --out")
    p.add_argument("--out", type=Path, default=Path("runs/finetune-quality"))
    p.add_argument("--problems", type=int, default=50, help="held-out problems per task")
    p.add_argument("--student-steps", type=int, default=1500, help="pretraining steps of the distillation student")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (the rest: data)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--student-data", type=int, default=0,
                   help="train the students on only this many conversations (0: all); the teacher saw all of them")
    p.add_argument("--student-seed", type=int, default=0, help="data order of the two student runs")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args()
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    synth = args.speedrun / "synth"
    base = list_checkpoints(args.speedrun / "pretrain")[-1][1]
    results: dict = {"base": str(base)}

    # 1. SFT: full vs LoRA
    results["full"] = sft_run("full", base, synth, args.out, [])
    results["lora"] = sft_run("lora", base, synth, args.out, ["train.lr=3e-3"], adapter="lora")
    results["base_chat"] = chat_accuracy(base, None, synth, args.problems)
    for name in ("full", "lora"):
        results[name]["chat"] = chat_accuracy(base, Path(results[name]["checkpoint"]), synth, args.problems)

    # 2. distillation: a small student, on the data alone vs distilled from the fully fine-tuned teacher
    from lmlab.tune.distill import distill_objective

    student = pretrain_student(args.speedrun, args.out, args.student_steps)
    teacher = Path(results["full"]["checkpoint"])
    limit = [f"data.limit={args.student_data}"] if args.student_data else []
    limit += [f"train.seed={args.student_seed}"] if args.student_seed else []
    suffix = (f"-n{args.student_data}" if args.student_data else "") + (
        f"-s{args.student_seed}" if args.student_seed else "")
    results["student_sft"] = sft_run(f"student-sft{suffix}", student, synth, args.out, limit)

    def distilled(cfg):
        model = load(teacher).eval()
        for q in model.parameters():
            q.requires_grad_(False)
        return lambda _: distill_objective(model, "forward_kl", temperature=args.temperature, alpha=args.alpha)

    results["student_distill"] = sft_run(f"student-distill-a{args.alpha:g}-t{args.temperature:g}{suffix}", student,
                                         synth, args.out, limit, objective_factory=distilled)
    for name in ("student_sft", "student_distill"):
        results[name]["chat"] = chat_accuracy(student, Path(results[name]["checkpoint"]), synth, args.problems)
    results["student_base_chat"] = chat_accuracy(student, None, synth, args.problems)

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    tasks = list(results["base_chat"]["accuracy"])
    rows = [("base model (no SFT)", results["base_chat"], None, None),
            ("full fine-tuning", results["full"]["chat"], results["full"], "full"),
            ("LoRA r=4, all projections", results["lora"]["chat"], results["lora"], "lora"),
            ("student, pretrained only", results["student_base_chat"], None, None),
            (f"student, SFT on the data{' (' + str(args.student_data) + ' chats)' if args.student_data else ''}",
             results["student_sft"]["chat"], results["student_sft"], None),
            (f"student, distilled (forward KL, alpha {args.alpha:g}, T {args.temperature:g})",
             results["student_distill"]["chat"], results["student_distill"], None)]
    print("| model | trainable | " + " | ".join(tasks) + " | mean | ended its turn | held-out loss | forgetting |")
    print("|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|")
    for label, chat, run, _ in rows:
        cells = [f"{100 * chat['accuracy'][t]:.0f}%" for t in tasks]
        if run is None:
            extra = ["", "", ""]
        else:
            f = run["forgetting"]
            share = run["params"]["trainable"] / run["params"]["total"]
            extra = [f"{run['held_out_loss']:.3f}", f"{f['before']:.3f} -> {f['after']:.3f}" if "after" in f else ""]
            extra = [f"{100 * share:.1f}%", *extra]
        print(f"| {label} | {extra[0]} | " + " | ".join(cells) + f" | {100 * chat['mean']:.1f}% | "
              f"{100 * chat['ended_turn']:.0f}% | {extra[1]} | {extra[2]} |")


if __name__ == "__main__":
    main()

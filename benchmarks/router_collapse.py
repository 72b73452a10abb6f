"""Router collapse: a small mixture-of-experts model trained without load balancing, with the Switch
auxiliary loss, and with DeepSeek-V3's auxiliary-loss-free bias balancing, for the same steps on the
built-in synthetic corpus, recording every layer's per-expert load at every step.

Without balancing, a router tends to collapse (Shazeer et al. 2017; Fedus et al. 2021): the experts that
win early get the gradient, improve, and win more, until a few of them take most tokens. The two remedies:

    aux   the Switch/GShard loss  alpha * E * sum_i f_i P_i  added to the loss   (moe.aux_loss_coef)
    bias  DeepSeek-V3: sigmoid router, a per-expert bias on the selection scores, moved by
          u * sign(mean load - load) after every optimizer step                 (moe.bias_balancing)

and two controls without any balancing: "none" (the softmax router of "aux") and "sigmoid" (the router of
"bias"), so that each remedy is compared with its own router left alone.

Load statistics, per layer, then averaged over layers: load_max = max_i load_i / mean load (1 = even,
E = everything on one expert) and the normalized entropy of the load H(load) / ln E (1 = even). The
table gives the peak of load_max (9-step moving average), then means over the last 20% of steps: load_max,
the share of assignments taken by the two busiest experts, the load entropy; and the final validation loss
(cross-entropy only: the auxiliary loss is not counted). The plot shows load_max per step for each method,
and each method's final per-expert load of layer 0.

Everything runs through lmlab's one training loop (`lmlab.train.loop.train`) with the `next_token`
objective; the data is generated into a temporary directory (or --data DIR, reused when present).

    python benchmarks/router_collapse.py                 # 8 experts top-2, 400 steps: a few minutes on 2 cores
    python benchmarks/router_collapse.py --quick         # a smoke run
    python benchmarks/router_collapse.py --router-std 0.02 --lr 3e-3   # the model's default router init
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from lmlab.model import build_model
from lmlab.model.moe import moe_layers
from lmlab.train.config import resolve
from lmlab.train.loop import train
from lmlab.train.objectives import next_token

REPO = Path(__file__).resolve().parent.parent
METHODS = {
    "none": {"router": "softmax_topk"},
    "aux": {"router": "softmax_topk", "aux_loss_coef": 0.01},
    "sigmoid": {"router": "sigmoid"},
    "bias": {"router": "sigmoid", "bias_balancing": True},
}


def make_data(root: Path, n_docs: int, vocab: int) -> Path:
    """The synthetic corpus (stories, arithmetic, retrieval), a BPE tokenizer and token shards under root."""
    from lmlab.data.shards import write_shards
    from lmlab.data.synthetic import SynthConfig, generate
    from lmlab.tokenizer import Tokenizer

    if (root / "shards/meta.json").is_file():
        return root
    generate(root / "synth", SynthConfig.from_size(n_docs=n_docs), progress=False, overwrite=True)
    docs = [json.loads(line)["text"] for line in (root / "synth/pretrain/train.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.train(docs, vocab_size=vocab, progress=False)
    tokenizer.save(root / "tok")
    write_shards(docs, tokenizer, root / "shards", val_fraction=0.05, workers=1, progress=False)
    return root


def recipe(args: argparse.Namespace, data: Path, out_dir: Path, moe: dict) -> dict:
    return {
        "model": {"d_model": args.d_model, "n_layers": args.layers, "n_heads": 4, "n_kv_heads": 2,
                  "d_ff": args.d_expert, "max_seq_len": args.seq_len, "tie_embeddings": True,
                  "moe": {"n_experts": args.experts, "top_k": args.top_k, "d_expert": args.d_expert,
                          "bias_update_rate": args.bias_rate, **moe}},
        "data": {"path": str(data / "shards"), "tokenizer": str(data / "tok"), "seq_len": args.seq_len},
        "train": {"out_dir": str(out_dir), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "log_every": 10, "eval_every": 0, "save_every": 0, "sample_tokens": 0, "threads": args.threads,
                  "seed": args.seed, "grad_clip": 1.0},
        "optim": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"name": "cosine", "warmup_steps": max(1, args.steps // 20), "min_lr_ratio": 0.1},
    }


def load_max(load: torch.Tensor) -> torch.Tensor:
    """(..., E) load fractions -> max / mean."""
    return load.amax(dim=-1) * load.shape[-1]


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    return -(load * load.clamp_min(1e-12).log()).sum(dim=-1) / math.log(load.shape[-1])


def busiest_share(load: torch.Tensor, n: int = 2) -> torch.Tensor:
    """The share of all assignments that the n busiest experts take (n / E when even)."""
    return load.topk(n, dim=-1).values.sum(dim=-1)


def smooth(curve: torch.Tensor, width: int = 9) -> torch.Tensor:
    return torch.nn.functional.avg_pool1d(curve[None, None], width, 1, width // 2, count_include_pad=False)[0, 0]


def run(name: str, args: argparse.Namespace, data: Path, work: Path) -> dict:
    from lmlab.train.pretrain import validation_loss

    cfg = resolve(recipe(args, data, work / name, METHODS[name]))
    torch.manual_seed(args.seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # the router's initial scale (the model's generic init is init_std = 0.02)
        for layer in moe_layers(model):
            layer.router.weight.normal_(0.0, args.router_std)
    loads: list[torch.Tensor] = []  # per step: (layers, E)

    def objective(m, batch):
        loss, metrics = next_token(m, batch)
        loads.append(torch.stack([layer.stats["load"] for layer in moe_layers(m)]).detach().cpu())
        return loss, metrics

    from lmlab.data.loader import PackedLoader
    from lmlab.train.distributed import DistEnv

    loader = PackedLoader(cfg.data.path, "train", cfg.data.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    start = time.perf_counter()
    train(cfg, model, objective, loader, progress=args.progress, overwrite=True, desc=name)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val = validation_loss(model, cfg, DistEnv(device=torch.device("cpu")), args.eval_batches)
    history = torch.stack(loads)  # (steps, layers, E)
    tail = history[-max(1, len(loads) // 5):]
    curve = load_max(history).mean(dim=1)
    return {
        "name": name, "seconds": seconds, "val_loss": val,
        "load_max_curve": curve.tolist(),
        "load_max_peak": smooth(curve).max().item(),
        "load_max_tail": load_max(tail).mean().item(),
        "busiest2_tail": busiest_share(tail).mean().item(),
        "load_entropy_tail": load_entropy(tail).mean().item(),
        "final_load": history[-1].tolist(),
        "expert_bias": [layer.expert_bias.tolist() for layer in moe_layers(model) if layer.expert_bias is not None],
    }


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for r in results:
        curve = torch.tensor(r["load_max_curve"])
        ax.plot(range(1, len(curve) + 1), smooth(curve), label=f"{r['name']} (val loss {r['val_loss']:.3f})")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("load_max = max load / mean load (mean over layers)")
    ax.axhline(args.experts / args.top_k, color="gray", lw=0.8, ls="--")  # one expert in every token's top-k
    ax.set_title(f"{args.experts} experts, top-{args.top_k}: expert load during training")
    ax.legend()
    width = 0.8 / len(results)
    for j, r in enumerate(results):
        layer0 = torch.tensor(r["final_load"][0]) * args.experts
        bars.bar(torch.arange(args.experts) + (j - (len(results) - 1) / 2) * width, layer0, width, label=r["name"])
    bars.axhline(1.0, color="gray", lw=0.8, ls=":")
    bars.set_xlabel("expert (layer 0)")
    bars.set_ylabel("load / mean load at the last step")
    bars.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--quick", action="store_true", help="a smoke run: 40 steps, a smaller corpus")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-expert", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--router-std", type=float, default=0.02, help="std of the router's initial weights")
    p.add_argument("--bias-rate", type=float, default=1e-3, help="moe.bias_update_rate of the bias method")
    p.add_argument("--docs", type=int, default=4000, help="pretraining documents of the synthetic corpus")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="1: on a shared machine more threads mostly spin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, help="where to keep the generated corpus (default: a temporary directory)")
    p.add_argument("--plot", type=Path, default=REPO / "docs/img/moe_router_collapse.png")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.steps, args.docs, args.eval_batches = 40, 600, 4
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(args.data or Path(tmp) / "data", args.docs, args.vocab)
        results = [run(name, args, data, Path(tmp) / "runs") for name in args.methods]

    print(f"\n{args.experts} experts top-{args.top_k}, d_model {args.d_model}, {args.layers} layers, "
          f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens, lr {args.lr}, "
          f"router init std {args.router_std}")
    print(f"load_max: 1 = even, {args.experts / args.top_k:g} = one expert in every token's top-{args.top_k}; "
          f"busiest 2: their share of assignments ({2 / args.experts:.2f} when even); last 20% of the steps")
    print(f"{'method':<10}{'peak load_max':>15}{'load_max':>10}{'busiest 2':>11}{'load entropy':>14}{'val loss':>10}"
          f"{'seconds':>9}")
    for r in results:
        print(f"{r['name']:<10}{r['load_max_peak']:>15.2f}{r['load_max_tail']:>10.2f}{r['busiest2_tail']:>11.2f}"
              f"{r['load_entropy_tail']:>14.3f}{r['val_loss']:>10.4f}{r['seconds']:>9.0f}")
    plot(results, args, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()

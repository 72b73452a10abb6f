"""Training throughput: tokens/s of whole optimizer steps, lmlab against transformers' LlamaForCausalLM
of the same configuration, with the same weights, batch, precision (float32), optimizer and threads.

One optimizer step, as a training run takes it, on each side:
    zero_grad -> for each of --grad-accum micro-batches: forward + next-token loss, backward(loss / n)
    -> clip_grad_norm_(1.0) -> AdamW step (weight decay on matrices only)
lmlab runs its training path, `model(x, targets=y, return_logits=False)` (the loss fused with the
output projection, lmlab/model/loss.py); transformers runs `model(input_ids=x, labels=y,
shift_labels=y)` with its default SDPA attention (shift_labels: the same targets, not shifted again).
Both get the identical torch.optim.AdamW (--optimizer-impl picks its kernel for both).

Before timing each row, both models are reset to the same initial weights, and the first (warm-up)
step must give the same loss and the same gradient norm on both sides, so the comparison is of
equal work. Steps then alternate between the sides (ABAB...) and the median of --repeats is
reported, so background load hits both alike. With --compile, torch.compile'd lmlab is compared
with torch.compile'd transformers as a separate pair (never compiled against eager).
--with-logits-path adds a third side: lmlab computing full logits then the loss (its inference
path), to show what the fused loss is worth on its own. On a machine that other jobs share,
`--threads 1 --clock cpu` times the step in CPU seconds of this process, which their load barely
changes (two threads in wall-clock time are slowed many times over by a busy neighbour).

    python benchmarks/train_throughput.py --preset speedrun     # the speedrun recipe's model
    python benchmarks/train_throughput.py --preset default --compile
    python benchmarks/train_throughput.py --vocab 4096 --d-model 256 --layers 6 --heads 4 --kv-heads 4 \\
        --d-ff 704 --shapes 8x256 2x1024
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import add_clock_argument, timed  # benchmarks/common.py: scripts run as `python benchmarks/NAME.py`
from tqdm import tqdm

# Model sizes; flags given on the command line override them.
PRESETS = {
    # recipes/speedrun.toml's model with the speedrun's 2048-token tokenizer, and its batch
    "speedrun": dict(vocab=2048, d_model=192, layers=6, heads=6, kv_heads=2, d_ff=512, tie=True,
                     shapes=["16x256", "4x1024"]),
    # a speedrun-sized model with a 4096-token vocabulary, untied
    "small": dict(vocab=4096, d_model=256, layers=6, heads=4, kv_heads=4, d_ff=704, tie=False,
                  shapes=["8x256", "2x1024"]),
    # the 32M configuration of benchmarks/forward_backward.py
    "default": dict(vocab=8192, d_model=512, layers=8, heads=8, kv_heads=4, d_ff=1408, tie=False,
                    shapes=["4x256", "2x1024"]),
    # ModelConfig()'s defaults: a Llama-2-sized 32000-token vocabulary on a small body (58M parameters)
    "modelconfig": dict(vocab=32000, d_model=512, layers=8, heads=8, kv_heads=8, d_ff=1536, tie=False,
                        shapes=["4x256", "2x1024"]),
}
OPTIMIZER_IMPLS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size and batch shapes")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's)")
    p.add_argument("--d-model", type=int, help="hidden size (default: the preset's)")
    p.add_argument("--layers", type=int, help="number of layers (default: the preset's)")
    p.add_argument("--heads", type=int, help="attention heads (default: the preset's)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: the preset's)")
    p.add_argument("--d-ff", type=int, help="MLP hidden size (default: the preset's)")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, help="tie embeddings and output head")
    p.add_argument("--shapes", nargs="+", metavar="BxT", help="micro-batch shapes, e.g. 8x256 2x1024")
    p.add_argument("--grad-accum", type=int, nargs="+", default=[1, 4], metavar="N",
                   help="micro-batches per optimizer step; each value is timed at the first shape (1 at every shape)")
    p.add_argument("--optimizer-impl", choices=sorted(OPTIMIZER_IMPLS), default="default",
                   help="torch.optim.AdamW kernel for both sides: torch's default (a per-parameter loop on CPU), "
                        "foreach=True or fused=True")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd lmlab vs torch.compile'd HF")
    p.add_argument("--with-logits-path", action="store_true",
                   help="also time lmlab with materialized logits (return_logits=True), the unfused loss")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side and row (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    add_clock_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes]
        if any(len(s) != 2 or min(s) < 1 for s in args.shapes):
            raise ValueError
    except ValueError:
        p.error(f"--shapes takes BxT pairs of positive integers such as 8x256, got {' '.join(map(str, args.shapes))}")
    if min(args.grad_accum) < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--grad-accum, --repeats and --threads must be positive")
    if args.d_model % args.heads or args.heads % args.kv_heads:
        p.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}, "
                f"and --heads by --kv-heads {args.kv_heads}")
    return args


def build_pair(args: argparse.Namespace):
    """A random HF Llama, saved and loaded into lmlab through the converter: identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.model.hub import load_hf

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=args.d_ff,
        max_position_embeddings=max(2048, max(t for _, t in args.shapes)), tie_word_embeddings=args.tie,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = LlamaForCausalLM(hf_cfg).float()
    hf.config._attn_implementation = "sdpa"  # transformers' default; said explicitly, as it is the CPU path
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf(d, dtype=torch.float32)
    return hf, ours


@dataclass
class Side:
    """One library's model and how it computes the training loss of a micro-batch."""

    name: str
    model: torch.nn.Module  # the eager module, owner of the parameters
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (module, x, y) -> loss

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def lmlab_loss(model, x, y):
    return model(x, targets=y, return_logits=False).loss


def lmlab_logits_loss(model, x, y):
    return model(x, targets=y).loss


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y, shift_labels=y).loss


def adamw(model: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (embeddings and projections) only, as GPT-style recipes do."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, **OPTIMIZER_IMPLS[impl])


def make_step(side: Side, module: torch.nn.Module, opt: torch.optim.Optimizer,
              micro_batches: list) -> Callable[[], tuple[float, float]]:
    """One optimizer step over the micro-batches; returns (mean loss, gradient norm before clipping)."""
    n = len(micro_batches)

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in micro_batches:
            loss = side.loss_fn(module, x, y)
            (loss / n).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(side.model.parameters(), 1.0)
        opt.step()
        return float(total) / n, float(norm)

    return step


def check_logits(hf, ours, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"the two models differ (max abs logit difference {diff:.2e}); the benchmark would be unfair")
    return diff


def run_row(label: str, sides: list[Side], initial: list[dict], micro_batches: list, args, compiled: bool) -> dict:
    """Reset every side to the initial weights, take one warm-up step each (and check that they agree),
    then alternate timed steps. Returns tokens/s per side and the ratios to transformers."""
    steps = {}
    for side, state in zip(sides, initial, strict=True):
        side.model.load_state_dict(state)
        # static shapes, one graph per row, as a run with a fixed batch shape compiles
        module = torch.compile(side.model, dynamic=False) if compiled else side.model
        steps[side.name] = make_step(side, module, adamw(side.model, args.optimizer_impl), micro_batches)
    warm = {name: step() for name, step in steps.items()}  # compiles, when compiled
    ref_loss, ref_norm = warm["transformers"]
    for name, (loss, norm) in warm.items():
        if abs(loss - ref_loss) > 1e-5 * abs(ref_loss) or abs(norm - ref_norm) > 1e-4 * abs(ref_norm):
            sys.exit(f"{label}: {name} gives loss {loss:.7f} and gradient norm {norm:.7f}, transformers "
                     f"{ref_loss:.7f} and {ref_norm:.7f}: not the same computation, so no fair comparison")
    times = {name: [] for name in steps}
    for _ in tqdm(range(args.repeats), desc=label, leave=False, disable=args.no_progress):
        for name, step in steps.items():
            times[name] += timed(step, 1, args.clock)
    tokens = sum(x.numel() for x, _ in micro_batches)
    tok_s = {name: tokens / statistics.median(t) for name, t in times.items()}
    row = {"label": label, "compiled": compiled, "tokens_per_step": tokens, "warmup_loss": ref_loss,
           "warmup_grad_norm": ref_norm, "tok_s": tok_s, "step_s": {k: sorted(v) for k, v in times.items()},
           "ratio": {name: tok_s[name] / tok_s["transformers"] for name in tok_s if name != "transformers"}}
    others = "   ".join(f"{name} {tok_s[name]:>8.0f}" for name in tok_s if name != "transformers")
    ratios = "  ".join(f"{r:.2f}x" for r in row["ratio"].values())
    print(f"{label:<34} {others}   transformers {tok_s['transformers']:>8.0f} tok/s   ratio {ratios}", flush=True)
    return row


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": machine(),
                "threads": args.threads}
    print(f"torch {versions['torch']}, transformers {versions['transformers']}, {versions['cpu']}, "
          f"{args.threads} threads, float32, AdamW impl {args.optimizer_impl!r}, {args.clock} clock")
    print(f"Llama config: vocab {args.vocab}, d_model {args.d_model}, layers {args.layers}, heads {args.heads}, "
          f"kv_heads {args.kv_heads}, d_ff {args.d_ff}, tied {args.tie}")
    hf, ours = build_pair(args)
    logit_diff = check_logits(hf, ours, args.vocab)
    sides = [Side("lmlab", ours, lmlab_loss), Side("transformers", hf, hf_loss)]
    if args.with_logits_path:
        sides.insert(1, Side("lmlab-logits", copy.deepcopy(ours), lmlab_logits_loss))  # own weights and optimizer
    initial = [side.snapshot() for side in sides]

    g = torch.Generator().manual_seed(0)
    rows = []
    jobs = [(shape, 1) for shape in args.shapes] + [(args.shapes[0], n) for n in args.grad_accum if n > 1]
    for compiled in (False, True) if args.compile else (False,):
        for (batch, seq), accum in jobs:
            ids = torch.randint(0, args.vocab, (accum, batch, seq + 1), generator=g)
            micro = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in ids]
            label = f"{'compiled' if compiled else 'eager'} {batch}x{seq}" + (f" x{accum} accum" if accum > 1 else "")
            rows.append(run_row(label, sides, initial, micro, args, compiled))
    if args.json:
        from lmlab.atomic import atomic_file

        args.shapes = [f"{b}x{t}" for b, t in args.shapes]
        with atomic_file(args.json, "w") as f:
            json.dump({"args": vars(args), "versions": versions, "logit_max_abs_diff": logit_diff, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()

"""Peak memory and step time of one training step: full fine-tuning vs LoRA vs QLoRA, on the same model.

    full   AdamW on every parameter
    lora   LoRA (rank --rank, alpha --alpha) on every attention and MLP projection, the base frozen
    qlora  the same LoRA on a base whose projections are stored in NF4 (lmlab/tune/nf4.py: blocks of --block,
           double quantization); embeddings, norms and the output head stay as they were

A step is what a training run does: forward with the next-token loss (fused with the output projection, as
lmlab's loop computes it), backward, AdamW step, zero_grad. Each method runs in a fresh subprocess, so the
peaks of one never mix into another's, and reports:

- trainable parameters;
- "weights": the bytes of the model's parameters and buffers, counted tensor by tensor;
- "w+g+adam": weights + a gradient and AdamW's two moments per trainable parameter (computed, not measured):
  the memory that parameter-efficient fine-tuning exists to save;
- "peak": measured peak memory of a warm-up step and one more, above the process before the model was
  built (after one step of a toy model, so that the threads and workspaces a process starts once are not
  counted as the model's). On CUDA: torch.cuda.max_memory_allocated. On CPU: the process's peak resident
  set (Linux VmHWM), reset after the model is built and prepared (so building the float model that QLoRA
  then quantizes does not count), minus the resident set before the model existed. That process runs with
  glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so that freed tensors go back to the system instead of
  staying in the allocator's heap and inflating later readings;
- median step time over --steps timed steps, after one warm-up step (--clock cpu: CPU seconds of the
  worker process, for a machine that other jobs share). On CPU the time is taken in a second process with
  the default allocator, as training runs it (the fixed threshold costs page faults on every step).

Ratios are against full fine-tuning. The model is random: a Llama-style lmlab Transformer built from the
flags (the default is 32M parameters), or --model DIR (an lmlab or Hugging Face checkpoint).

    python benchmarks/peft_memory.py                              # CPU: float32, batch 4 x 256
    python benchmarks/peft_memory.py --threads 1 --clock cpu      # a CPU that other jobs share
    python benchmarks/peft_memory.py --model path/to/checkpoint --batch 8 --seq 512
    python benchmarks/peft_memory.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import CLOCKS, add_clock_argument, write_json  # benchmarks/common.py

METHODS = ("full", "lora", "qlora")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an lmlab or Hugging Face checkpoint directory (default: a random model built "
                                   "from the size flags below)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--d-model", type=int, default=512, help="hidden size")
    p.add_argument("--layers", type=int, default=8, help="number of layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--d-ff", type=int, default=1408, help="MLP hidden size")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to measure")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--block", type=int, default=64, help="NF4 weights per absmax block")
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    add_clock_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)  # one method, in this process
    p.add_argument("--measure", choices=("memory", "time", "both"), default="both", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if min(args.batch, args.seq, args.steps, args.threads, args.rank) < 1:
        p.error("--batch, --seq, --steps, --threads and --rank must be positive")
    if args.model and not Path(args.model).is_dir():
        p.error(f"--model {args.model} is not a directory; give an lmlab or Hugging Face checkpoint directory")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device {args.device}: this benchmark measures memory on cpu or cuda")
    if args.device.startswith("cuda") and not _cuda():
        p.error("--device cuda, but torch sees no CUDA device here")
    if args.device == "cpu" and not Path("/proc/self/status").exists():
        p.error("measuring CPU memory needs Linux's /proc (VmRSS, VmHWM); run on Linux, or with --device cuda")
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- memory probes --------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Memory:
    """Bytes in use now, and the peak since `reset_peak`, on the device the model lives on."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def now(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        return 1024 * _status_kib("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:  # "5" resets the peak resident set size (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        return 1024 * _status_kib("VmHWM")


# --- one method, in its own process ---------------------------------------------------------------
def build(args: argparse.Namespace):
    import torch

    from lmlab.model import ModelConfig, build_model, load

    dtype = getattr(torch, args.dtype)
    if args.model:
        return load(args.model, device=args.device, dtype=dtype)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, d_ff=args.d_ff, max_seq_len=max(2048, args.seq))
    return build_model(cfg, device=args.device, dtype=dtype)


def prepare(model, method: str, args: argparse.Namespace) -> None:
    from lmlab.tune.adapters import AdapterConfig, apply_adapter

    if method == "full":
        model.requires_grad_(True)
        return
    cfg = AdapterConfig(method="lora", r=args.rank, alpha=args.alpha, targets=["all-linear"],
                        quantize="nf4" if method == "qlora" else "none", quant_block=args.block,
                        double_quant=not args.no_double_quant)
    apply_adapter(model, cfg)


def warm_up_runtime(args: argparse.Namespace) -> None:
    """One training step of the method on a toy model, freed again: the first backward and optimizer step
    start threads and allocate workspaces once per process (about 100 MiB of resident memory on CPU), which is
    not the model's memory and would otherwise count in the first method's peak."""
    import torch

    from lmlab.model import ModelConfig, build_model

    toy = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16),
                      device=args.device, dtype=getattr(torch, args.dtype))
    prepare(toy, args.worker, args)
    ids = torch.randint(0, 64, (2, 17), device=args.device)
    opt = torch.optim.AdamW([p for p in toy.parameters() if p.requires_grad])
    toy(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss.backward()
    opt.step()
    del toy, opt


def worker(args: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm

    from lmlab.tune.adapters import count_parameters
    from lmlab.tune.nf4 import model_nbytes

    torch.set_num_threads(args.threads)
    memory = Memory(args.device)
    warm_up_runtime(args)
    gc.collect()
    before = memory.now()
    model = build(args)
    prepare(model, args.worker, args)
    model.train()
    gc.collect()
    at_rest = memory.now() - before
    trainable = [p for p in model.parameters() if p.requires_grad]
    counts = count_parameters(model)
    weights = model_nbytes(model)
    # a gradient and AdamW's exp_avg and exp_avg_sq per trainable parameter, each in the parameter's dtype
    state = sum(3 * p.numel() * p.element_size() for p in trainable)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(args.device)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> float:
        loss = model(x, targets=y, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device

    memory.reset_peak()
    losses, times = [step()], []  # the warm-up step allocates AdamW's state
    clock = CLOCKS[args.clock]
    steps = 1 if args.measure == "memory" else args.steps  # the peak is reached within the first two steps
    for _ in tqdm(range(steps), desc=f"{args.worker} ({args.measure})", leave=False, disable=args.no_progress):
        t = clock()
        losses.append(step())
        times.append(clock() - t)
    return {"method": args.worker, "trainable": counts.trainable, "total": counts.total, "weights_bytes": weights,
            "state_bytes": weights + state, "at_rest_bytes": at_rest, "peak_bytes": memory.peak() - before,
            "step_s": statistics.median(times), "step_times": times, "losses": losses}


def run_worker(method: str, argv: list[str], measure: str) -> dict:
    env = dict(os.environ)
    if measure == "memory":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # see the module docstring
    # stdout carries the result; stderr (progress bar, errors) goes to the terminal
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", method, "--measure", measure], env=env,
                         stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"the {method} run failed (its error is above)")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(method: str, argv: list[str], device: str) -> dict:
    """One method's row. On CPU, memory and time come from two processes: the allocator setting that makes
    resident memory track the tensors (fresh pages for every large tensor) would also slow every step."""
    if device.startswith("cuda"):
        return run_worker(method, argv, "both")
    row = run_worker(method, argv, "time")
    mem = run_worker(method, argv, "memory")
    row.update(peak_bytes=mem["peak_bytes"], at_rest_bytes=mem["at_rest_bytes"])
    return row


# --- the table ------------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def print_table(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["method"] == "full"), rows[0])
    print(f"| method | trainable params | weights MiB | w+g+adam MiB | peak MiB | step s | "
          f"peak vs {ref['method']} | step time vs {ref['method']} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
              f"{mib(r['weights_bytes'])} | {mib(r['state_bytes'])} | {mib(r['peak_bytes'])} | {r['step_s']:.3f} | "
              f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x | {r['step_s'] / ref['step_s']:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    source = args.model or (f"random lmlab Transformer: vocab {args.vocab}, d_model {args.d_model}, "
                            f"{args.layers} layers, {args.heads} heads / {args.kv_heads} KV, d_ff {args.d_ff}")
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {args.threads} threads, {args.clock} clock; "
          f"{source}")
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps; LoRA r={args.rank} alpha={args.alpha} "
          f"on all-linear; QLoRA: NF4 block {args.block}, double quantization {not args.no_double_quant}")
    rows = []
    for method in args.methods:
        row = measure(method, argv, args.device)
        rows.append(row)
        print(f"  {method}: {row['step_s']:.3f} s/step, peak {mib(row['peak_bytes'])} MiB, "
              f"loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}", flush=True)
    print_table(rows)
    if args.json:
        write_json(args.json, {"args": vars(args), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()

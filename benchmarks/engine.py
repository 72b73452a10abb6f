"""Serving throughput: lmlab's `Engine` (paged KV cache, continuous batching, speculative decoding)
against one-prompt-at-a-time generation and against transformers' static batched `generate`.

All on the CPU in float32, greedy (temperature 0), no stop token (every request runs max_new_tokens),
random weights (throughput does not depend on what the weights say). Throughput is generated tokens
per second; each timing is the median of --repeats runs after a warm-up run, the sides alternating.
On a machine that other jobs share, `--threads 1 --clock cpu` times in CPU seconds of this process,
which their load barely changes (two threads in wall-clock time are slowed many times over by a busy
neighbour; see benchmarks/common.py).

(a) batching: --requests prompts of random lengths in [--min-prompt, --max-prompt] and --new-tokens
    new tokens each. `Engine.generate` with every request queued at once, against
    `lmlab.infer.generate.generate` called for one prompt at a time (the same decode loop without
    batching). How many of the engine's outputs equal the plain ones (its correctness promise) is reported.
(b) against transformers: the same model exported with `lmlab.model.hub.save_hf` and loaded with
    `AutoModelForCausalLM.from_pretrained` (its default SDPA attention), `generate(..., do_sample=False,
    max_new_tokens=N, min_new_tokens=N)` on all requests as one left-padded batch: the static batch a
    script without a serving engine runs, which needs every request before it starts. The engine
    instead gets the requests arriving over time: request i joins before engine step
    floor(i * --arrival-gap) (the first at step 0), and its time counts from the first arrival to
    the last token, including the steps it spends with only some requests there. (The all-at-once
    engine time is reported too.) The agreement of the two sides' tokens is reported: requests whose
    output is identical, and the share of tokens generated before the first difference. Near-ties
    between the two largest logits can flip under float32 rounding differences, after which the
    continuations differ legitimately.
(c) speculative decoding: the engine with speculative="draft" and with "ngram" (prompt lookup)
    against the same engine without speculation, for 1 request and for a batch of --spec-batch, with
    --spec-new-tokens new tokens; it reports the acceptance rate spec_accepted / spec_drafted and
    checks that the greedy tokens are the same as without speculation.
    The draft/target pair, built to accept often without any training: the draft is a random model
    of --draft-layers layers; the target has the draft's embedding, output head, final norm and first
    --draft-layers blocks (copied), followed by --extra-layers randomly initialized blocks whose
    residual output projections (attn.o_proj and mlp.down_proj weights) are multiplied by
    --extra-scale. Each extra block adds only a small perturbation to the residual stream, so the
    target is nearly the draft's function at several times its cost. Both use --spec-init-std, so that
    the logits are spread enough that a small perturbation rarely flips the argmax.
    The ngram rows need output that repeats earlier text, which a random model does not produce on
    its own. So they use a target built like the draft rows' one but with sliding-window attention
    (--copy-window tokens in every layer): its next token is then a function of its last
    n_layers * (window - 1) + 1 tokens only (RoPE makes it independent of absolute positions). Each
    prompt is a random --copy-passage-token passage S, the model's own greedy continuation C of S
    (--spec-new-tokens tokens), and S again; the model then re-emits C, a copy of earlier text, as in
    editing or quoting workloads, and prompt lookup can find it. (The passage must be at least the
    receptive field long; the script checks it.)
    With --spec-temperature > 0, one more row runs the draft pair sampled (seeded): the acceptance
    rate of the rejection-sampling rule, and the speed (its tokens differ from the plain run's).

    python benchmarks/engine.py                          # everything, default sizes
    python benchmarks/engine.py --only spec --repeats 5
    python benchmarks/engine.py --threads 1 --clock cpu             # on a shared, busy machine
    python benchmarks/engine.py --d-model 256 --layers 6 --heads 4 --kv-heads 2 --vocab 4096 --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from common import CLOCKS, add_clock_argument, write_json  # benchmarks/common.py
from tqdm import tqdm

from lmlab.infer import SamplingParams, generate
from lmlab.infer.engine import Engine, EngineConfig
from lmlab.model import ModelConfig, Transformer, build_model

PARTS = ("batching", "hf", "spec")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    g = p.add_argument_group("model (parts a and b)")
    g.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    g.add_argument("--d-model", type=int, default=256, help="hidden size")
    g.add_argument("--layers", type=int, default=6, help="number of layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    g.add_argument("--d-ff", type=int, default=704, help="MLP hidden size")
    g.add_argument("--max-seq-len", type=int, default=512, help="the model's context")
    g = p.add_argument_group("workload (parts a and b)")
    g.add_argument("--requests", type=int, default=32, help="concurrent requests")
    g.add_argument("--min-prompt", type=int, default=16, help="shortest prompt, tokens")
    g.add_argument("--max-prompt", type=int, default=128, help="longest prompt, tokens")
    g.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    g.add_argument("--arrival-gap", type=float, default=1.0,
                   help="part b: engine steps between two arrivals (request i joins before step floor(i * gap))")
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-batch-tokens", type=int, default=512, help="tokens fed per engine step at most")
    g = p.add_argument_group("speculative decoding (part c)")
    g.add_argument("--draft-layers", type=int, default=2, help="layers of the draft (shared with the target)")
    g.add_argument("--extra-layers", type=int, default=10, help="near-identity layers the target adds")
    g.add_argument("--extra-scale", type=float, default=0.05,
                   help="factor on the extra layers' o_proj and down_proj weights (0: target = draft exactly)")
    g.add_argument("--spec-init-std", type=float, default=0.1, help="init_std of the pair's random weights")
    g.add_argument("--num-spec-tokens", type=int, default=4, help="k, tokens proposed per step")
    g.add_argument("--spec-batch", type=int, default=4, help="requests in the batched speculative rows")
    g.add_argument("--spec-prompt", type=int, default=32, help="prompt length of the draft rows")
    g.add_argument("--spec-new-tokens", type=int, default=128, help="tokens generated per request")
    g.add_argument("--copy-window", type=int, default=4, help="ngram rows: the target's sliding window")
    g.add_argument("--copy-passage", type=int, default=48, help="ngram rows: tokens of the passage S")
    g.add_argument("--spec-temperature", type=float, default=1.0,
                   help="temperature of the extra sampled draft row (0: no such row)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    add_clock_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights and prompts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if min(args.requests, args.min_prompt, args.new_tokens, args.repeats, args.threads, args.spec_batch,
           args.spec_prompt, args.spec_new_tokens, args.copy_window, args.copy_passage, args.draft_layers) < 1:
        p.error("sizes, counts, --repeats and --threads must be positive")
    if args.max_prompt < args.min_prompt:
        p.error(f"--max-prompt {args.max_prompt} is below --min-prompt {args.min_prompt}")
    if args.max_prompt + args.new_tokens > args.max_seq_len:
        p.error(f"--max-prompt + --new-tokens = {args.max_prompt + args.new_tokens} exceeds --max-seq-len "
                f"{args.max_seq_len}")
    spec_len = max(args.spec_prompt, 2 * args.copy_passage + args.spec_new_tokens) + args.spec_new_tokens
    if spec_len > args.max_seq_len:
        p.error(f"the speculative rows need {spec_len} positions, more than --max-seq-len {args.max_seq_len}")
    if args.d_model % args.heads or args.heads % args.kv_heads:
        p.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}, "
                f"and --heads by --kv-heads {args.kv_heads}")
    if args.arrival_gap < 0 or args.extra_layers < 0 or args.num_spec_tokens < 1 or args.spec_temperature < 0:
        p.error("--arrival-gap, --extra-layers and --spec-temperature must be >= 0, --num-spec-tokens >= 1")
    reach = (args.draft_layers + args.extra_layers) * (args.copy_window - 1) + 1
    if args.copy_passage < reach:
        p.error(f"--copy-passage {args.copy_passage} is shorter than the ngram target's receptive field ({reach} "
                "tokens): the model would not re-emit its continuation; lengthen it or narrow --copy-window")
    return args


# --- models and workloads ------------------------------------------------------------------------


def model_config(args: argparse.Namespace, **overrides) -> ModelConfig:
    fields = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                  n_kv_heads=args.kv_heads, d_ff=args.d_ff, max_seq_len=args.max_seq_len)
    return ModelConfig(**{**fields, **overrides})


def random_model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@torch.no_grad()
def speculative_pair(args: argparse.Namespace, **overrides) -> tuple[Transformer, Transformer]:
    """(target, draft): see the module docstring, part (c); overrides: config fields of both."""
    draft = random_model(model_config(args, n_layers=args.draft_layers, init_std=args.spec_init_std, **overrides),
                         args.seed + 1)
    target = random_model(model_config(args, n_layers=args.draft_layers + args.extra_layers,
                                       init_std=args.spec_init_std, **overrides), args.seed + 2)
    own = {name: t for name, t in draft.state_dict().items()}
    # the draft's blocks keep their indices; embed, lm_head and the final norm have the same names
    target.load_state_dict(own, strict=False)
    for block in target.blocks[args.draft_layers:]:
        block.attn.o_proj.weight.mul_(args.extra_scale)
        block.mlp.down_proj.weight.mul_(args.extra_scale)
    return target, draft


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


def copy_prompts(model: Transformer, n: int, passage: int, new_tokens: int, seed: int) -> list[list[int]]:
    """Prompts S + C + S: a random passage S, the model's greedy continuation C of it, S again."""
    passages = random_prompts(n, passage, passage, model.cfg.vocab_size, seed)
    continuations = generate(model, passages, greedy(new_tokens))
    return [s + c.token_ids + s for s, c in zip(passages, continuations, strict=True)]


# --- the sides ------------------------------------------------------------------------------------


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0)


def engine_config(args: argparse.Namespace, n_seqs: int, **overrides) -> EngineConfig:
    return EngineConfig(block_size=args.block_size, max_num_seqs=n_seqs,
                        max_batch_tokens=max(args.max_batch_tokens, n_seqs), **overrides)


def run_sequential(model: Transformer, prompts: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
    return [generate(model, [p], greedy(new_tokens))[0].token_ids for p in prompts]


@dataclass
class EngineRun:
    outputs: list[list[int]]
    steps: int
    drafted: int
    accepted: int


def run_engine(model: Transformer, prompts: Sequence[list[int]], params: SamplingParams, config: EngineConfig,
               draft: Transformer | None = None, arrival_gap: float | None = None) -> EngineRun:
    """One fresh engine (an empty prefix cache) serving all prompts: queued at once (arrival_gap None),
    or request i added before step floor(i * arrival_gap)."""
    engine = Engine(model, config=config, draft=draft)
    gap = 0.0 if arrival_gap is None else arrival_gap
    reqs, step = [], 0
    while len(reqs) < len(prompts) or engine.has_unfinished():
        while len(reqs) < len(prompts) and int(len(reqs) * gap) <= step:
            reqs.append(engine.add_request(prompts[len(reqs)], params))
        engine.step()
        step += 1
    stats = engine.stats()
    if stats.blocks_used:
        sys.exit(f"the engine holds {stats.blocks_used} KV blocks after every request finished: a leak")
    return EngineRun([r.output for r in reqs], step, stats.spec_drafted, stats.spec_accepted)


def hf_twin(model: Transformer, tmp: str):
    """transformers' model with the same weights, through lmlab's exporter; checks the logits agree."""
    from transformers import AutoModelForCausalLM

    from lmlab.model.hub import save_hf

    path = save_hf(model, os.path.join(tmp, "hf"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # random weights: no token ends a sequence
    hf.generation_config.pad_token_id = 0
    ids = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - model(ids).logits).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"the HF twin's logits differ from lmlab's by {diff:.2e}; the comparison would be unfair")
    return hf, diff


def run_hf(hf, prompts: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' static batch: left padding, greedy, exactly new_tokens each."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, L:].tolist()


# --- timing ---------------------------------------------------------------------------------------


def time_sides(sides: dict[str, Callable[[], object]], args: argparse.Namespace, label: str):
    """Run each side once to warm up (its result is kept), then --repeats timed runs alternating between
    sides (ABAB: background load hits all alike), on --clock. Returns ({side: result}, {side: median seconds})."""
    clock, repeats, progress = CLOCKS[args.clock], args.repeats, not args.no_progress
    results = {name: fn() for name, fn in sides.items()}
    times = {name: [] for name in sides}
    for _ in tqdm(range(repeats), desc=label, leave=False, disable=not progress):
        for name, fn in sides.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return results, {name: statistics.median(t) for name, t in times.items()}


def agreement(a: Sequence[list[int]], b: Sequence[list[int]]) -> tuple[int, float]:
    """(identical outputs, share of tokens before each pair's first difference)."""
    same, prefix, total = 0, 0, 0
    for x, y in zip(a, b, strict=True):
        same += x == y
        n = next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y)))
        prefix += n
        total += max(len(x), len(y))
    return same, prefix / max(total, 1)


def row(what: str, lmlab: float, peer: float, unit: str = "tok/s", **extra) -> dict:
    return {"what": what, "lmlab": lmlab, "peer": peer, "unit": unit, "ratio": lmlab / peer, **extra}


# --- the three parts --------------------------------------------------------------------------------


def bench_batching(args, model, prompts) -> list[dict]:
    n_tokens = len(prompts) * args.new_tokens
    cfg = engine_config(args, len(prompts))
    results, secs = time_sides({
        "engine": lambda: run_engine(model, prompts, greedy(args.new_tokens), cfg),
        "sequential": lambda: run_sequential(model, prompts, args.new_tokens),
    }, args, "batching")
    same, prefix = agreement(results["engine"].outputs, results["sequential"])
    return [row(f"{len(prompts)} requests: Engine vs plain generate one at a time", n_tokens / secs["engine"],
                n_tokens / secs["sequential"], peer_name="lmlab generate, sequential",
                identical=f"{same}/{len(prompts)}", token_agreement=prefix, seconds=secs)]


def bench_hf(args, model, prompts) -> tuple[list[dict], float]:
    n_tokens = len(prompts) * args.new_tokens
    cfg = engine_config(args, len(prompts))
    with tempfile.TemporaryDirectory() as tmp:
        hf, diff = hf_twin(model, tmp)
        results, secs = time_sides({
            "staggered": lambda: run_engine(model, prompts, greedy(args.new_tokens), cfg, arrival_gap=args.arrival_gap),
            "at_once": lambda: run_engine(model, prompts, greedy(args.new_tokens), cfg),
            "hf": lambda: run_hf(hf, prompts, args.new_tokens),
        }, args, "vs transformers")
    rows = []
    for side, what in (("staggered", f"arriving one per {args.arrival_gap:g} step(s)"), ("at_once", "all at once")):
        same, prefix = agreement(results[side].outputs, results["hf"])
        rows.append(row(f"{len(prompts)} requests, {what}: Engine vs transformers static batch",
                        n_tokens / secs[side], n_tokens / secs["hf"], peer_name="transformers generate, batch",
                        identical=f"{same}/{len(prompts)}", token_agreement=prefix, engine_steps=results[side].steps,
                        seconds=secs))
    return rows, diff


def bench_speculative(args) -> list[dict]:
    target, draft = speculative_pair(args)
    print(f"speculative pair: draft {sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M parameters "
          f"({args.draft_layers} layers), target {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M "
          f"({args.draft_layers}+{args.extra_layers} layers, extra output projections x{args.extra_scale:g})")
    k, B, M = args.num_spec_tokens, args.spec_batch, args.spec_new_tokens
    local, _ = speculative_pair(args, sliding_window=args.copy_window)
    workloads = [
        ("draft", target, draft, random_prompts(B, args.spec_prompt, args.spec_prompt, args.vocab, args.seed + 3),
         greedy(M)),
        ("ngram", local, None, copy_prompts(local, B, args.copy_passage, M, args.seed + 4), greedy(M)),
    ]
    if args.spec_temperature > 0:
        workloads.append(("draft", target, draft, workloads[0][3],
                          SamplingParams(max_new_tokens=M, temperature=args.spec_temperature, seed=args.seed)))
    rows = []
    for kind, model, draft_model, all_prompts, params in workloads:
        for n in dict.fromkeys((1, B)) if params.greedy else (B,):
            prompts = all_prompts[:n]
            plain_cfg = engine_config(args, n)
            spec_cfg = engine_config(args, n, speculative=kind, num_speculative_tokens=k)
            results, secs = time_sides({
                "spec": lambda m=model, p=prompts, c=spec_cfg, d=draft_model, sp=params: run_engine(m, p, sp, c, d),
                "plain": lambda m=model, p=prompts, c=plain_cfg, sp=params: run_engine(m, p, sp, c),
            }, args, f"{kind} x{n}")
            spec = results["spec"]
            if params.greedy and spec.outputs != results["plain"].outputs:
                sys.exit(f"speculative={kind!r} changed the greedy tokens: the verification is broken")
            what = (f"speculative {kind} (k={k}), {n} request{'s' if n > 1 else ''}"
                    + (", copy prompts" if kind == "ngram" else "")
                    + ("" if params.greedy else f", sampled at temperature {params.temperature:g}"))
            n_tokens = sum(len(o) for o in spec.outputs)
            rows.append(row(what + ": Engine vs Engine without speculation", n_tokens / secs["spec"],
                            sum(len(o) for o in results["plain"].outputs) / secs["plain"],
                            peer_name="Engine, no speculation", acceptance=spec.accepted / max(spec.drafted, 1),
                            drafted=spec.drafted, accepted=spec.accepted, engine_steps=spec.steps,
                            plain_steps=results["plain"].steps, seconds=secs))
    return rows


# --- report ---------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    print("\n| what | lmlab | peer | ratio | notes |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        notes = [r["peer_name"]]
        if "identical" in r:
            notes.append(f"identical outputs {r['identical']}, tokens before first difference "
                         f"{100 * r['token_agreement']:.1f}%")
        if "acceptance" in r:
            notes.append(f"acceptance {100 * r['acceptance']:.1f}% ({r['accepted']}/{r['drafted']}), "
                         f"{r['engine_steps']} steps vs {r['plain_steps']}")
        print(f"| {r['what']} | {r['lmlab']:.0f} {r['unit']} | {r['peer']:.0f} {r['unit']} | "
              f"{r['ratio']:.2f}x | {'; '.join(notes)} |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, float32, "
          f"greedy, {args.clock} clock; load average {load_before[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
    cfg = model_config(args)
    model = random_model(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: vocab {args.vocab}, d_model {args.d_model}, layers {args.layers}, heads {args.heads}, "
          f"kv_heads {args.kv_heads}, d_ff {args.d_ff}: {n_params / 1e6:.1f}M parameters; "
          f"{args.requests} requests, prompts {args.min_prompt}..{args.max_prompt} tokens, {args.new_tokens} new")
    prompts = random_prompts(args.requests, args.min_prompt, args.max_prompt, args.vocab, args.seed)
    rows, logit_diff = [], None
    if "batching" in args.only:
        rows += bench_batching(args, model, prompts)
    if "hf" in args.only:
        hf_rows, logit_diff = bench_hf(args, model, prompts)
        rows += hf_rows
    if "spec" in args.only:
        rows += bench_speculative(args)
    print_table(rows)
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.2f} (1 min)")
    result = {"args": vars(args), "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "parameters": n_params, "hf_logit_max_abs_diff": logit_diff, "load_average": [load_before, load_after],
              "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

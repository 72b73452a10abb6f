"""lmlab's transformer against transformers' LlamaForCausalLM of the same configuration, same weights.

Measures, on CPU in float32 with a fixed thread count:
  - training step tokens/s: forward + backward + AdamW step on a (batch, seq) block;
  - decode tokens/s with a KV cache at batch 1 and batch 8: greedy generation of --new-tokens
    tokens after a --prompt-len token prompt, through each library's own generation API
    (lmlab.infer.generate vs transformers' `generate`), prefill included.
Runs alternate between the two libraries (ABAB...) and the median of --repeats is reported, so
background load on the machine hits both alike. Before timing, it checks that the two models
give the same logits and the same greedy tokens, so the comparison is of equal work.

    python benchmarks/forward_backward.py            # the configuration in docs/benchmarks.md
    python benchmarks/forward_backward.py --d-model 768 --layers 12 --threads 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from common import timed  # benchmarks/common.py: scripts run as `python benchmarks/NAME.py`


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--batch", type=int, default=4, help="training batch size")
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args()


def build_pair(args):
    """A random HF Llama, saved and loaded into lmlab through the converter: identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.model.hub import load_hf

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.d_ff, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    hf.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf(d, dtype=torch.float32).eval()
    return hf, ours


def check_equal(hf, ours, args) -> None:
    ids = torch.randint(0, args.vocab, (2, 32))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4, f"models differ (max abs logit diff {diff}); the benchmark would be unfair"


def training_step(model, ids, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        if is_hf:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts inside
        else:
            loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def decoding(model, prompts, new_tokens: int, is_hf: bool):
    if is_hf:
        ids = torch.tensor(prompts)

        def run():
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                )
            return out[:, ids.shape[1] :].tolist()
    else:
        from lmlab.infer.generate import generate
        from lmlab.infer.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)

        def run():
            return [c.token_ids for c in generate(model, prompts, params)]

    return run


def compare(name, runs: dict, repeats: int, units: float) -> dict:
    """Alternate the two runners, `repeats` times each, after one warm-up call of each."""
    for fn in runs.values():
        fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k] += timed(fn, 1)
    tps = {k: units / statistics.median(v) for k, v in times.items()}
    ratio = tps["lmlab"] / tps["transformers"]
    print(f"{name:<28} lmlab {tps['lmlab']:>9.1f} tok/s   "
          f"transformers {tps['transformers']:>9.1f} tok/s   ratio {ratio:.2f}x")
    return {"lmlab_tok_s": tps["lmlab"], "transformers_tok_s": tps["transformers"], "ratio": ratio}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, float32, CPU")
    print(f"Llama config: vocab {args.vocab}, d_model {args.d_model}, layers {args.layers}, heads {args.heads}, "
          f"kv_heads {args.kv_heads}, d_ff {args.d_ff}")
    hf, ours = build_pair(args)
    check_equal(hf, ours, args)
    results = {}

    g = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        prompts = torch.randint(1, args.vocab, (batch, args.prompt_len), generator=g).tolist()
        ours_run = decoding(ours, prompts, args.new_tokens, False)
        hf_run = decoding(hf, prompts, args.new_tokens, True)
        assert ours_run() == hf_run(), "greedy tokens differ between lmlab and transformers"
        results[f"decode_b{batch}"] = compare(
            f"decode (B={batch}, {args.prompt_len}+{args.new_tokens})",
            {"lmlab": ours_run, "transformers": hf_run}, args.repeats, batch * args.new_tokens,
        )
    # last: the training steps change both models' weights
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    results["train_step"] = compare(
        f"train step (B={args.batch}, T={args.seq})",
        {"lmlab": training_step(ours, ids, False), "transformers": training_step(hf, ids, True)},
        args.repeats, args.batch * args.seq,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

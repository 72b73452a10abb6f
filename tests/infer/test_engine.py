"""The serving engine against plain generation: the same tokens for every request, whatever else runs
beside it, whenever it arrives, and however the paged cache is squeezed (chunked prefill, preemption,
prefix sharing); no KV block leaked; streaming, stops, cancellation and errors."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from lmlab.infer.engine import Engine, EngineConfig
from lmlab.infer.generate import generate, stream
from lmlab.infer.paged import PagedKVCache, packable
from lmlab.infer.sampling import SamplingParams
from lmlab.model import ModelConfig, build_model
from lmlab.model.config import MoEConfig

V = 97

MODELS = {
    "llama": dict(),  # RoPE, GQA, SwiGLU, RMSNorm
    "gpt2": dict(position="learned", norm="layernorm", mlp_gated=False, mlp_activation="gelu_tanh", n_kv_heads=4,
                 qkv_bias=True, tie_embeddings=True),
    "window": dict(sliding_window=8, layer_types=["sliding", "full"], attn_softcap=30.0),
    "alibi": dict(position="alibi", qk_norm=True),
    "moe": dict(moe=MoEConfig(n_experts=4, top_k=2, d_expert=32, n_shared_experts=1)),  # routing per token
}


def tiny(kind: str = "llama", seed: int = 0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=160)
    kw.update(MODELS[kind])
    kw.update(over)
    return build_model(ModelConfig(**kw)).eval()


def random_prompts(rng: random.Random, n: int, lo: int = 1, hi: int = 50) -> list[list[int]]:
    return [[rng.randrange(V) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def random_params(rng: random.Random, greedy: bool) -> SamplingParams:
    """Mixed per-request settings; seeded when sampled, so the expected tokens are known."""
    p = SamplingParams(max_new_tokens=rng.randrange(1, 24), temperature=0.0,
                       stop_token_ids=[rng.randrange(V)] if rng.random() < 0.3 else [])
    if not greedy:
        p = replace(p, temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([None, 5, 20]),
                    top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]), seed=rng.randrange(2**31))
    if rng.random() < 0.25:
        p = replace(p, repetition_penalty=1.3)
    return p


def run_staggered(engine: Engine, prompts, params, rng: random.Random, logprobs=None):
    """Add the requests at random steps (several may arrive together), step until all are done."""
    pending = list(range(len(prompts)))
    reqs = {}
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if pending:
                i = pending.pop(0)
                reqs[i] = engine.add_request(prompts[i], params[i], logprobs=logprobs)
        engine.step()
    return [reqs[i] for i in range(len(prompts))]


def assert_same_as_generate(model, prompts, params, reqs):
    for prompt, p, req in zip(prompts, params, reqs, strict=True):
        (ref,) = generate(model, [prompt], p)
        assert req.output == ref.token_ids, (prompt, p)
        assert (req.finish_reason, req.stop_reason) == (ref.finish_reason, ref.stop_reason)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("cache", ["roomy", "tight"])
def test_mixed_requests_equal_plain_generation(kind, cache):
    """Random lengths, arrival times and sampling settings: greedy and seeded requests give exactly the tokens
    of generate() alone. "tight": small blocks, few of them, a small token budget, so that prompts are prefilled
    in chunks and requests are preempted and recomputed."""
    model = tiny(kind)
    rng = random.Random(f"{kind}-{cache}")
    prompts = random_prompts(rng, 24)
    prompts += [prompts[0][:10] + [1, 2, 3], prompts[0][:10] + [4]]  # a shared prefix
    params = [random_params(rng, greedy=rng.random() < 0.6) for _ in prompts]
    config = (EngineConfig(block_size=16, max_num_seqs=32, max_batch_tokens=512) if cache == "roomy" else
              EngineConfig(block_size=4, num_blocks=41, max_num_seqs=8, max_batch_tokens=16))
    engine = Engine(model, config=config)
    reqs = run_staggered(engine, prompts, params, rng)
    assert_same_as_generate(model, prompts, params, reqs)
    stats = engine.stats()
    if cache == "tight":
        assert stats.preemptions > 0
    assert stats.blocks_used == 0 and stats.running == stats.waiting == 0
    engine.blocks.check()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "window"])
def test_packed_step_equals_padded_step(kind):
    """A packed pass (every row's new tokens end to end, attention per group of rows) gives each row the logits of
    the padded pass and writes the same keys and values: rows with and without context, prompt chunks beside
    single-token decodes, a sliding window shorter than some contexts, soft-capped attention."""
    model = tiny(kind)
    bs, context, new = 4, [0, 5, 17, 30, 3, 9], [7, 1, 1, 12, 4, 1]
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, V, (c + n,), generator=g).tolist() for c, n in zip(context, new, strict=True)]
    tables, next_block = [], 1
    for c, n in zip(context, new, strict=True):
        need = -(-(c + n) // bs)
        tables.append(list(range(next_block, next_block + need)))
        next_block += need
    pools = [PagedKVCache(model.cfg, next_block, bs) for _ in range(2)]
    assert packable(model)

    def padded(pool, rows, ctx, feed):
        ids = torch.zeros(len(rows), max(map(len, feed)), dtype=torch.long)
        for i, f in enumerate(feed):
            ids[i, : len(f)] = torch.tensor(f)
        step = pool.step([tables[r] for r in rows], ctx, [len(f) for f in feed])
        return model.logits(model.hidden_states(ids, step, positions=step.positions))

    with torch.no_grad():
        have = [i for i, c in enumerate(context) if c]
        for pool in pools:  # the contexts, written identically into both pools
            padded(pool, have, [0] * len(have), [tokens[i][: context[i]] for i in have])
        feeds = [t[c:] for t, c in zip(tokens, context, strict=True)]
        want = padded(pools[0], list(range(len(new))), context, feeds)
        step = pools[1].packed_step(tables, context, new)
        ids = torch.tensor([t for f in feeds for t in f])[None]
        got = model.logits(model.hidden_states(ids, step, positions=step.positions))[0]
    assert len(step.groups) > 1  # the chunks and the decodes attend in separate groups
    for i, rows in enumerate(got.split(new)):
        torch.testing.assert_close(rows, want[i, : new[i]], rtol=1e-5, atol=1e-5)
    for a, b in zip(pools[0].k + pools[0].v, pools[1].k + pools[1].v, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_packed_steps_only_for_plain_attention():
    """ALiBi (a bias over the whole pass) and prefix tuning keep the padded path; plain attention models pack."""
    assert packable(tiny("llama")) and packable(tiny("gpt2")) and packable(tiny("window"))
    assert not packable(tiny("alibi"))
    model = tiny("llama")
    model.blocks[1].attn.prefix = lambda batch_size: None
    assert not packable(model)


def test_logprobs_equal_plain_generation():
    model = tiny()
    rng = random.Random(1)
    prompts = random_prompts(rng, 6)
    p = SamplingParams(max_new_tokens=8, temperature=0)
    engine = Engine(model, config=EngineConfig(block_size=4, max_batch_tokens=40))
    reqs = run_staggered(engine, prompts, [p] * 6, rng, logprobs=3)
    for prompt, req in zip(prompts, reqs, strict=True):
        (ref,) = generate(model, [prompt], p, logprobs=True)
        torch.testing.assert_close(torch.tensor(req.logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)
        for lp, top in zip(req.logprobs, req.top_logprobs, strict=True):
            assert len(top) == 3 and top[0][1] == pytest.approx(lp)  # greedy: the chosen token is the top one
            assert top[0][1] >= top[1][1] >= top[2][1]


def test_no_block_leaks_after_1000_requests():
    """1,000 requests of every kind (finished by length, by stop id, aborted while waiting or running, preempted)
    through a small pool: afterwards every block is free, and reference counts never went wrong on the way."""
    model = tiny(d_model=32, n_layers=1)
    rng = random.Random(2)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=48, max_num_seqs=16, max_batch_tokens=64))
    base = random_prompts(rng, 4, 10, 30)
    added = 0
    finished = set()
    while added < 1000 or engine.has_unfinished():
        for _ in range(rng.randrange(0, 6)):
            if added < 1000:
                prompt = rng.choice(base)[: rng.randrange(1, 30)] + random_prompts(rng, 1, 1, 8)[0]
                p = SamplingParams(max_new_tokens=rng.randrange(1, 12), temperature=rng.choice([0, 1.0]),
                                   stop_token_ids=[rng.randrange(V)])
                engine.add_request(prompt, p, request_id=f"r{added}")
                added += 1
        if engine.requests and rng.random() < 0.1:
            assert engine.abort(rng.choice(list(engine.requests)))
        finished.update(r.id for r in engine.step())
        engine.blocks.check()
    stats = engine.stats()
    assert stats.finished_requests == 1000
    assert stats.blocks_used == 0 and all(r == 0 for r in engine.blocks.refs)
    assert stats.preemptions > 0 and stats.prefix_hit_tokens > 0


def test_prefix_blocks_are_shared_while_both_run():
    model = tiny()
    shared = list(range(1, 41))  # 40 tokens: 10 full blocks of 4
    engine = Engine(model, config=EngineConfig(block_size=4))
    p = SamplingParams(max_new_tokens=5, temperature=0)
    a = engine.add_request(shared + [50], p)
    engine.step()  # a's prompt is computed and its full blocks cached
    b = engine.add_request(shared + [60, 61], p)
    engine.step()
    assert a.table[:10] == b.table[:10]
    assert all(engine.blocks.refs[blk] == 2 for blk in a.table[:10])
    assert engine.stats().prefix_hit_tokens == 40
    engine.run()
    assert_same_as_generate(model, [shared + [50], shared + [60, 61]], [p, p], [a, b])
    # after both finished the blocks stay cached (free, reusable): a third request hits them too
    c = engine.add_request(shared + [70], p)
    engine.run()
    assert engine.stats().prefix_hit_tokens == 80 and c.output == generate(model, [shared + [70]], p)[0].token_ids


def test_prefix_caching_off_shares_nothing():
    model = tiny()
    engine = Engine(model, config=EngineConfig(block_size=4, prefix_caching=False))
    p = SamplingParams(max_new_tokens=3, temperature=0)
    engine.generate([list(range(1, 41))] * 3, p)
    assert engine.stats().prefix_hit_tokens == 0


def test_long_prefill_is_chunked_and_does_not_stall_decoding():
    model = tiny()
    engine = Engine(model, config=EngineConfig(block_size=8, max_batch_tokens=20, max_num_seqs=4))
    p = SamplingParams(max_new_tokens=40, temperature=0)
    short = [engine.add_request([5, 6, 7], p) for _ in range(3)]
    engine.step()
    long_prompt = list(range(1, 97)) + list(range(1, 25))  # 120 tokens: > 7 chunks of <= 17
    long = engine.add_request(long_prompt, p)
    steps = 0
    while long.num_computed < len(long_prompt):
        before = [len(r.output) for r in short]
        engine.step()
        steps += 1
        assert [len(r.output) for r in short] == [n + 1 for n in before]  # every decode advanced
    assert steps >= len(long_prompt) // 17
    engine.run()
    assert_same_as_generate(model, [long_prompt], [p], [long])


def test_streaming_chunks_text_and_stop_strings(tiny_base):
    from lmlab.model import load
    from lmlab.tokenizer import load_tokenizer

    model, tok = load(tiny_base).eval(), load_tokenizer(tiny_base)
    engine = Engine(model, tok)
    prompts = [tok.encode(t, add_special_tokens=True) for t in ["Once upon a time", "The cat", "1 + 1 ="]]
    p = SamplingParams(max_new_tokens=30, temperature=0)
    (ref,) = generate(model, [prompts[0]], p, decode=tok.decode)
    stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 3]  # a stop string met midway
    params = [replace(p, stop=[stop]), p, replace(p, temperature=0.9, seed=3)]
    chunks = {i: [] for i in range(3)}
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(prompt, sp, on_chunk=lambda r, c, i=i: chunks[i].append(c))
    engine.run()
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        expected = list(stream(model, prompt, sp, decode=tok.decode))
        got = chunks[i]
        assert "".join(c.text for c in got) == "".join(c.text for c in expected)
        assert [c.token_id for c in got] == [c.token_id for c in expected]
        assert got[-1].finish_reason == expected[-1].finish_reason and all(c.finish_reason is None for c in got[:-1])
    assert chunks[0][-1].stop_reason == stop and stop not in "".join(c.text for c in chunks[0])


def test_abort_frees_blocks_and_reports():
    model = tiny()
    engine = Engine(model, config=EngineConfig(block_size=4, max_num_seqs=1))  # w waits while r runs
    seen = []
    r = engine.add_request(list(range(1, 30)), SamplingParams(max_new_tokens=50, temperature=0),
                           on_chunk=lambda req, c: seen.append(c))
    w = engine.add_request([1, 2], SamplingParams(max_new_tokens=50))
    for _ in range(3):
        engine.step()
    assert w in engine.waiting and len(r.output) == 3
    assert engine.abort(r.id) and engine.abort(w.id)
    assert not engine.abort(r.id) and not engine.abort("nope")
    assert r.finish_reason == w.finish_reason == "abort" and seen[-1].finish_reason == "abort"
    assert len(r.output) == 3 and not w.output and engine.stats().blocks_used == 0 and not engine.has_unfinished()


def test_context_limit_finishes_with_length():
    model = tiny()
    engine = Engine(model)
    prompt = [3] * 150
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=100, temperature=0))
    assert c.finish_reason == "length" and len(prompt) + len(c.token_ids) == model.cfg.max_seq_len


def test_bad_requests_and_configs_raise_clear_errors():
    model = tiny()
    engine = Engine(model)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.add_request([1, V])
    with pytest.raises(ValueError, match="context is 160"):
        engine.add_request([1] * 160)
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request([1], SamplingParams(stop=["x"]))
    engine.add_request([1], request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], request_id="a")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Engine(model, config=EngineConfig(max_num_seqs=64, max_batch_tokens=32))
    with pytest.raises(ValueError, match="num_blocks >= 11"):
        Engine(model, config=EngineConfig(num_blocks=4))
    with pytest.raises(ValueError, match="needs a draft model"):
        Engine(model, config=EngineConfig(speculative="draft"))

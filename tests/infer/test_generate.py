"""Generation: the cached decode loop against full forward passes, batched against alone, seeding,
stop token ids / stop strings / max_new_tokens, and streaming against generate."""

import dataclasses

import pytest
import torch

from lmlab.infer import Completion, IncrementalDetokenizer, SamplingParams, generate, stream
from lmlab.infer.sampling import apply_repetition_penalty
from lmlab.model import ModelConfig, Transformer, build_model

VOCAB = 100
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
            init_std=0.15)  # a large init spreads the logits: no near-ties for argmax to flip on

CONFIGS = {
    "rope_gqa": dict(n_kv_heads=2),
    "learned": dict(position="learned", norm="layernorm", mlp_gated=False, mlp_activation="gelu"),
    "alibi": dict(position="alibi"),
    "sliding": dict(sliding_window=3, n_kv_heads=2),  # far smaller than prompt + output
    "gemma2_like": dict(attn_softcap=5.0, logit_softcap=4.0, sliding_window=4,
                        layer_types=["sliding", "full"], tie_embeddings=True),
}


def make(name="rope_gqa", seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**BASE, **CONFIGS[name], **overrides})).eval()


def prompt(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g).tolist()


def two_chars(ids):
    """A decode where every token is two characters, so stop strings can start mid-token."""
    return "".join(chr(ord("a") + i % 26) + chr(ord("A") + i // 26) for i in ids)


GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


# --- the cache against full forward passes ---------------------------------------------------


@torch.no_grad()
def reference_greedy(model, ids, n, penalty=1.0):
    """argmax over full forward passes without a cache: the oracle for the decode loop."""
    ids, logits = list(ids), []
    for _ in range(n):
        step = model(torch.tensor([ids])).logits[0, -1]
        logits.append(step)
        scores = apply_repetition_penalty(step[None], torch.tensor([ids]), penalty)[0]
        ids.append(int(scores.argmax()))
    return ids[-n:], torch.stack(logits)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_full_forward(name):
    model = make(name)
    p = prompt(5, seed=5)
    (out,) = generate(model, [p], GREEDY, output_logits=True)
    tokens, logits = reference_greedy(model, p, 12)
    assert out.token_ids == tokens
    assert len(set(tokens)) > 4  # the model does not just repeat one token
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    assert out.finish_reason == "length" and out.stop_reason is None


def test_greedy_with_repetition_penalty_matches_full_forward():
    model = make()
    p = prompt(6, seed=3)
    params = dataclasses.replace(GREEDY, repetition_penalty=1.8)
    (out,) = generate(model, [p], params)
    assert out.token_ids == reference_greedy(model, p, 12, penalty=1.8)[0]
    assert out.token_ids != generate(model, [p], GREEDY)[0].token_ids  # the penalty did something


# --- batched against alone -------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_equals_alone(name):
    model = make(name)
    prompts = [prompt(n, seed=n) for n in (3, 8, 5, 1)]  # left padding of 5, 0, 3, 7
    batched = generate(model, prompts, GREEDY, output_logits=True, logprobs=True)
    for p, got in zip(prompts, batched, strict=True):
        (alone,) = generate(model, [p], GREEDY, output_logits=True, logprobs=True)
        assert got.token_ids == alone.token_ids
        torch.testing.assert_close(got.logits, alone.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.logprobs, alone.logprobs, rtol=0, atol=1e-5)


def test_batched_equals_alone_with_penalty_and_early_stops():
    model = make()
    prompts = [prompt(n, seed=n) for n in (2, 6, 4)]
    first = generate(model, prompts, GREEDY)
    # stop each row at a token it produces at some point: rows finish at different steps
    stops = [c.token_ids[k] for c, k in zip(first, (2, 5, 8), strict=True)]
    params = dataclasses.replace(GREEDY, stop_token_ids=stops, repetition_penalty=1.3)
    batched = generate(model, prompts, params)
    assert {c.finish_reason for c in batched} >= {"stop"}
    for p, got in zip(prompts, batched, strict=True):
        assert got == generate(model, [p], params)[0]  # padding token 0 is not "seen" either


def test_sampled_rows_do_not_depend_on_the_batch():
    model = make()
    prompts = [prompt(n, seed=n) for n in (3, 7, 5)]
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=50, seed=11)
    batched = generate(model, prompts, params)
    for p, got in zip(prompts, batched, strict=True):
        assert got == generate(model, [p], params)[0]
    # per-row seeds: independent rows, each as if alone with its own seed
    per_row = generate(model, [prompts[0]] * 3, params, seeds=[1, 2, 3])
    assert len({tuple(c.token_ids) for c in per_row}) == 3
    for s, got in zip([1, 2, 3], per_row, strict=True):
        assert got == generate(model, [prompts[0]], dataclasses.replace(params, seed=s))[0]


# --- seeding ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    model = make()
    prompts = [prompt(4), prompt(6, seed=1)]

    def run(seed):
        params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return [c.token_ids for c in generate(model, prompts, params)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    torch.manual_seed(0)  # unseeded: the global RNG
    unseeded = generate(model, prompts, SamplingParams(max_new_tokens=16))
    torch.manual_seed(0)
    assert unseeded == generate(model, prompts, SamplingParams(max_new_tokens=16))


# --- stopping --------------------------------------------------------------------------------


def test_max_new_tokens():
    model = make()
    for n in (1, 2, 7):
        params = SamplingParams(max_new_tokens=n, temperature=0)
        outs = generate(model, [prompt(3), prompt(9)], params)
        assert [len(c.token_ids) for c in outs] == [n, n]
        assert all(c.finish_reason == "length" and c.stop_reason is None for c in outs)


def test_stop_token_id_is_not_reported():
    model = make()
    p = prompt(5)
    tokens = generate(model, [p], GREEDY, two_chars)[0].token_ids
    k = next(i for i in range(2, 12) if tokens[i] not in tokens[:i])  # its first occurrence
    params = dataclasses.replace(GREEDY, stop_token_ids=[999, tokens[k]])
    (out,) = generate(model, [p], params, two_chars, logprobs=True)
    assert out.token_ids == tokens[:k]
    assert out.text == two_chars(tokens[:k])
    assert (out.finish_reason, out.stop_reason) == ("stop", tokens[k])
    assert len(out.logprobs) == k


def test_stop_string_spanning_two_tokens():
    model = make()
    p = prompt(5)
    (full,) = generate(model, [p], GREEDY, two_chars)
    # the 2nd character of token 4 and the 1st of token 5: starts mid-token, ends mid-token
    stop = full.text[9:11]
    cut = full.text.find(stop)  # its first occurrence (maybe earlier than 9)
    n_tokens = next(n for n in range(13) if stop in two_chars(full.token_ids[:n]))
    params = dataclasses.replace(GREEDY, stop=["never", stop])
    (out,) = generate(model, [p], params, two_chars)
    assert out.text == full.text[:cut]  # cut right before the stop string
    assert out.token_ids == full.token_ids[:n_tokens]  # the tokens that made it stay
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stop_strings_need_decode():
    with pytest.raises(ValueError, match="need a `decode`"):
        generate(make(), [prompt(3)], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="need a `decode`"):
        stream(make(), prompt(3), SamplingParams(stop=["x"]))  # raised at the call, not later


def test_learned_positions_cannot_go_past_max_seq_len():
    model = make("learned", max_seq_len=16)
    generate(model, [prompt(6)], SamplingParams(max_new_tokens=11, temperature=0))  # exactly fits
    with pytest.raises(ValueError, match=r"max_seq_len=16.*max_new_tokens <= 11"):
        generate(model, [prompt(6)], SamplingParams(max_new_tokens=12, temperature=0))
    # RoPE extrapolates: no limit is imposed beyond the cache
    params = SamplingParams(max_new_tokens=30, temperature=0)
    out = generate(make(max_seq_len=16), [prompt(6)], params)
    assert len(out[0].token_ids) == 30


def test_bad_prompts():
    model = make()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], GREEDY)
    with pytest.raises(ValueError, match=r"token id 100 outside .*\[0, 100\)"):
        generate(model, [[1, 100]], GREEDY)
    assert generate(model, [], GREEDY) == []


# --- streaming -------------------------------------------------------------------------------


def collect(chunks):
    chunks = list(chunks)
    tokens = [c.token_id for c in chunks if c.token_id is not None]
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason
    return chunks, tokens, "".join(c.text for c in chunks)


def assert_stream_equals_generate(model, p, params, decode):
    (expected,) = generate(model, [p], params, decode, logprobs=True)
    chunks, tokens, text = collect(stream(model, p, params, decode, logprobs=True))
    assert tokens == expected.token_ids
    assert text == (expected.text or "")
    assert chunks[-1].finish_reason == expected.finish_reason
    assert chunks[-1].stop_reason == expected.stop_reason
    logprobs = [c.logprob for c in chunks if c.token_id is not None]
    torch.testing.assert_close(logprobs, expected.logprobs)
    return expected


@pytest.mark.parametrize("seed", range(4))
def test_stream_equals_generate(seed):
    model = make()
    p = prompt(5, seed=seed)
    sampled = SamplingParams(max_new_tokens=20, temperature=1.2, top_k=40, min_p=0.02, seed=seed)
    full = generate(model, [p], sampled, two_chars)[0]
    assert_stream_equals_generate(model, p, sampled, None)
    assert_stream_equals_generate(model, p, sampled, two_chars)
    # stop conditions cut from what the unconstrained run produced
    with_stops = dataclasses.replace(sampled, stop=[full.text[13:16]],
                                     stop_token_ids=[full.token_ids[14]])
    out = assert_stream_equals_generate(model, p, with_stops, two_chars)
    assert out.finish_reason == "stop"


class Scripted(Transformer):
    """A Transformer forced to emit `script`: after n generated tokens, +100 on script[n]."""

    def __init__(self, script, vocab=256):
        torch.manual_seed(0)
        super().__init__(ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2,
                                     max_seq_len=128))
        self.script, self.step = script, 0

    def hidden_states(self, ids, cache=None, positions=None, attention_mask=None):
        self.step = 0 if cache is None or cache.length == 0 else self.step + 1
        return super().hidden_states(ids, cache, positions, attention_mask)

    def logits(self, h):
        logits = super().logits(h)
        if self.step < len(self.script):
            logits[..., self.script[self.step]] += 100.0
        return logits


def utf8(ids):
    """A byte-level decode: token i is byte i, so one character may take several tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_stream_never_emits_partial_characters():
    target = "hé€😀!"
    script = list(target.encode())
    model = Scripted(script)
    params = SamplingParams(max_new_tokens=len(script), temperature=0)
    chunks, tokens, text = collect(stream(model, [1], params, utf8))
    assert tokens == script and text == target
    assert all("\ufffd" not in c.text for c in chunks)
    assert [c.text for c in chunks] == ["h", "", "é", "", "", "€", "", "", "", "😀", "!"]
    assert generate(model, [[1]], params, utf8)[0].text == target


def test_incomplete_character_at_the_end_is_flushed():
    script = list("a€".encode())[:-1]  # stops in the middle of €
    model = Scripted(script)
    params = SamplingParams(max_new_tokens=len(script), temperature=0)
    _, _, text = collect(stream(model, [1], params, utf8))
    assert text == utf8(script) == generate(model, [[1]], params, utf8)[0].text == "a\ufffd"


def one_char(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_stream_holds_back_a_possible_stop_string():
    script = [ord(c) - ord("a") for c in "abcxyd"]
    model = Scripted(script, vocab=VOCAB)
    params = SamplingParams(max_new_tokens=6, temperature=0, stop=["xyz"])
    chunks, _, text = collect(stream(model, [1], params, one_char))
    assert [c.text for c in chunks] == ["a", "b", "c", "", "", "xyd"]  # "x", "xy" could start "xyz"
    assert chunks[-1].finish_reason == "length"
    # a stop string that completes: its first part was held back and is never emitted
    params = dataclasses.replace(params, stop=["xyz", "cx"])
    chunks, tokens, text = collect(stream(model, [1], params, one_char))
    assert [c.text for c in chunks] == ["a", "b", "", ""] and text == "ab"
    assert tokens == script[:4] and chunks[-1].stop_reason == "cx"
    assert generate(model, [[1]], params, one_char)[0] == Completion(script[:4], "ab", "stop", "cx")


def test_stream_stop_token_flushes_and_ends_without_a_token():
    script = [ord(c) - ord("a") for c in "abx"] + [99]
    model = Scripted(script, vocab=VOCAB)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop=["xy"], stop_token_ids=[99])
    chunks, tokens, text = collect(stream(model, [1], params, one_char))
    assert tokens == script[:3] and text == "abx"  # "x" was held back, released at the end
    assert chunks[-1].token_id is None and chunks[-1].text == "x"
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", 99)


def test_incremental_detokenizer_uses_prompt_context():
    # a SentencePiece-like decode that drops the leading space of the first token
    pieces = {0: "▁Hello", 1: "▁world", 2: "!"}

    def decode(ids):
        return "".join(pieces[i] for i in ids).replace("▁", " ").lstrip(" ")

    detok = IncrementalDetokenizer(decode, context=[0])
    assert detok.push(1) == " world" and detok.push(2) == "!" and detok.text == " world!"

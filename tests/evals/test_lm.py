"""The evaluation model adapter: log-likelihoods checked against a hand computation from the model's logits,
batching invariance, truncation, rolling windows, and generation through the engine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.evals.lm import LM, OpenAIEndpoint, bits_per_byte
from lmlab.infer import SamplingParams, generate


@pytest.fixture(scope="module")
def lm(tiny_base):
    return LM.from_dir(tiny_base, batch_size=3)


def _by_hand(lm: LM, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(ids).logits[0].float(), -1)
    rows = logp[len(ctx) - 1:-1]
    target = torch.tensor(cont)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_spaces_to_the_continuation(lm):
    ctx, cont = lm.encode_pair("Question: why?\nAnswer: ", "because")
    assert ctx == lm.encode("Question: why?\nAnswer:")
    assert ctx + cont == lm.encode("Question: why?\nAnswer: because")
    ctx, cont = lm.encode_pair("", "hello")
    assert ctx == [lm.prefix_token_id] and cont == lm.tokenizer.encode("hello")


def test_loglikelihood_equals_the_sum_of_token_log_probs(lm):
    requests = [("The cat sat on the", " mat"), ("Add 2 and 3.", " So 2 + 3 = 5."), ("a", " b c d e f g")]
    got = lm.loglikelihood(requests)
    for (c, x), (ll, greedy) in zip(requests, got, strict=True):
        want_ll, want_greedy = _by_hand(lm, *lm.encode_pair(c, x))
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy


def test_loglikelihood_does_not_depend_on_the_batch(tiny_base):
    requests = [("x" * n, " y" * (n % 5 + 1)) for n in range(1, 12)]
    one = LM.from_dir(tiny_base, batch_size=1).loglikelihood(requests)
    many = LM.from_dir(tiny_base, batch_size=16).loglikelihood(requests)
    assert [g for _, g in one] == [g for _, g in many]
    assert [ll for ll, _ in one] == pytest.approx([ll for ll, _ in many], abs=1e-4)


def test_greedy_continuation_is_flagged_greedy(lm):
    ctx = lm.encode("Once upon a time")
    with torch.no_grad():
        nxt = lm.model(torch.tensor([ctx])).logits[0, -1].argmax().item()
    (_, greedy), = lm.loglikelihood_tokens([(ctx, [nxt])])
    assert greedy
    (_, greedy), = lm.loglikelihood_tokens([(ctx, [(nxt + 1) % lm.model.cfg.vocab_size])])
    assert not greedy


def test_long_inputs_keep_their_last_max_length_plus_one_tokens(lm):
    L = lm.max_length
    ctx, cont = list(range(5, 5 + L + 40)), [7, 8, 9]
    kept = (ctx + cont)[-(L + 1):]
    (ll, _), = lm.loglikelihood_tokens([(ctx, cont)])
    want, _ = _by_hand(lm, kept[:-3], kept[-3:])
    assert ll == pytest.approx(want, abs=1e-4)


def test_rolling_windows_predict_every_token_once(lm):
    ids = list(range(3, 3 + 2 * lm.max_length + 17))
    windows = lm.rolling_windows(ids)
    predicted = [t for w, n in windows for t in w[-n:]]
    assert predicted == ids
    assert all(len(w) <= lm.max_length + 1 for w, _ in windows)  # max_length inputs, and the last target
    assert windows[0][0][0] == lm.prefix_token_id


def test_rolling_loglikelihood_of_a_short_text_by_hand(lm):
    text = "The little dog ran home."
    ids = lm.tokenizer.encode(text)
    want, _ = _by_hand(lm, [lm.prefix_token_id], ids)
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(want, abs=1e-4)
    assert bits_per_byte(-math.log(2) * 10, 10) == pytest.approx(1.0)


def test_generate_goes_through_the_engine_and_equals_plain_generate(lm):
    prompts = ["Once upon a time", "Add 12 and 30.\n", "The"]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    got = lm.generate(prompts, params)
    want = generate(lm.model, [lm.encode(p) for p in prompts],
                    SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=list(lm.tokenizer.eos_ids)),
                    decode=lm.tokenizer.decode)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    assert lm.engine.stats().blocks_used == 0 or lm.engine.stats().running == 0


def test_prompt_and_budget_are_fitted_to_the_context(lm):
    ctx = lm.model.cfg.max_seq_len
    assert lm.fit(list(range(10)), 20) == (list(range(10)), 20)
    ids, budget = lm.fit(list(range(ctx)), ctx)  # a budget as long as the context keeps half the prompt
    assert ids == list(range(ctx - ctx // 2, ctx)) and budget == ctx - ctx // 2
    ids, budget = lm.fit(list(range(ctx)), 8)
    assert len(ids) == ctx - 8 and budget == 8
    c, = lm.generate([list(range(5, 5 + ctx))], SamplingParams(max_new_tokens=ctx, temperature=0.0))
    assert len(c.token_ids) <= ctx - ctx // 2
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        lm.generate(["hi"], [SamplingParams(), SamplingParams()])


def test_openai_endpoint_against_lmlab_serve(tiny_base):
    pytest.importorskip("fastapi")
    from lmlab.infer import Engine
    from lmlab.infer.server import create_app, serve_in_thread

    lm = LM.from_dir(tiny_base)
    app = create_app(Engine(lm.model, lm.tokenizer), model_name="tiny")
    with serve_in_thread(app) as server:
        endpoint = OpenAIEndpoint(server.url, "tiny")
        params = SamplingParams(max_new_tokens=8, temperature=0.0)
        got = endpoint.generate(["Once upon a time", [{"role": "user", "content": "Hi"}]], params)
        local = lm.generate(["Once upon a time"], params)
        assert got[0].text == local[0].text
        assert isinstance(got[1].text, str) and got[1].finish_reason in ("stop", "length")
        from lmlab.evals.lm import EndpointError

        with pytest.raises(EndpointError, match="HTTP 404"):
            OpenAIEndpoint(server.url, "no-such-model").generate(["x"], params)


def test_choices_sharing_an_input_share_one_forward_pass(lm):
    ctx = lm.encode("Which letter?\nAnswer:")
    pairs = [(ctx, [t]) for t in (10, 11, 12, 13)] + [(ctx[:-1], [10]), (ctx, [10, 11])]
    calls = []
    hook = lm.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        got = lm.loglikelihood_tokens(pairs)
    finally:
        hook.remove()
    assert sum(calls) == 3  # three distinct inputs, however many single-token choices share the first
    for pair, (ll, greedy) in zip(pairs, got, strict=True):
        want_ll, want_greedy = _by_hand(lm, *pair)
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy

"""Knowledge distillation: each divergence against a direct implementation (torch.distributions or explicit sums),
its properties (zero iff equal, the forward-KL gradient, JSD's symmetry, bounds and beta limits), chunking, the
objective's mixing with the data loss and its vocabulary checks, and the teacher's generations for sequence-level
distillation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from lmlab.model import ModelConfig, Transformer, build_model
from lmlab.tokenizer.chat import end_of_turn_ids
from lmlab.tune import distill
from lmlab.tune.chat_data import prompt_of
from lmlab.tune.distill import (
    distill_objective,
    forward_kl,
    jsd,
    reverse_kl,
    same_vocabulary,
    shared_vocab_size,
    teacher_generations,
)

LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def logits(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def some_mask(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0], mask[-1, -1] = True, False  # at least one scored, one not
    return mask


def categorical(z, tau):
    return Categorical(logits=z / tau)


# --- each loss against a direct implementation ------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_forward_and_reverse_kl_match_torch_distributions(tau):
    s, t = logits(3, 7, 13, seed=1), logits(3, 7, 13, seed=2)
    mask = some_mask(3, 7)
    fwd = kl_divergence(categorical(t, tau), categorical(s, tau))  # KL(p_T || p_S) per position
    rev = kl_divergence(categorical(s, tau), categorical(t, tau))
    n = mask.sum()
    torch.testing.assert_close(forward_kl(s, t, mask, tau), tau**2 * fwd[mask].sum() / n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reverse_kl(s, t, mask, tau), tau**2 * rev[mask].sum() / n, rtol=1e-12, atol=1e-12)
    # the unscored positions really are left out: scoring everything gives another number
    assert not torch.isclose(forward_kl(s, t, None, tau), forward_kl(s, t, mask, tau))


@pytest.mark.parametrize("beta,tau", [(0.5, 1.0), (0.3, 2.0), (0.9, 0.7)])
def test_jsd_matches_explicit_sums(beta, tau):
    s, t = logits(2, 5, 11, seed=3), logits(2, 5, 11, seed=4)
    mask = some_mask(2, 5, seed=1)
    p_s, p_t = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)
    m = beta * p_t + (1 - beta) * p_s
    per_position = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    expected = tau**2 * per_position[mask].mean()
    torch.testing.assert_close(jsd(s, t, mask, tau, beta), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_zero_if_and_only_if_the_distributions_are_equal(name):
    s = logits(4, 9, 17, seed=5)
    shifted = s + logits(4, 9, 1, seed=6)  # a constant per position: the same softmax
    assert abs(float(LOSSES[name](shifted, s, None, 1.7))) < 1e-12
    other = s.clone()
    other[2, 3, 4] += 1.0  # one logit at one position
    assert float(LOSSES[name](other, s, None, 1.7)) > 1e-6
    # at a position that is not scored, a difference does not count
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[2, 3] = False
    assert abs(float(LOSSES[name](other, s, mask, 1.7))) < 1e-12


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_forward_kl_gradient_is_tau_times_p_s_minus_p_t_over_n(tau):
    s, t = logits(2, 6, 10, seed=7).requires_grad_(), logits(2, 6, 10, seed=8)
    mask = some_mask(2, 6, seed=2)
    forward_kl(s, t, mask, tau).backward()
    expected = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1)) / mask.sum()
    expected[~mask] = 0.0
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)


def test_reverse_kl_and_jsd_gradients_match_autograd_of_the_formulas():
    tau, beta = 1.5, 0.4
    s, t = logits(3, 4, 9, seed=9), logits(3, 4, 9, seed=10)

    def rev_ref(z):
        q, p = torch.log_softmax(z / tau, -1), torch.log_softmax(t / tau, -1)
        return tau**2 * (q.exp() * (q - p)).sum(-1).mean()

    def jsd_ref(z):
        p_s, p_t = torch.softmax(z / tau, -1), torch.softmax(t / tau, -1)
        m = beta * p_t + (1 - beta) * p_s
        return tau**2 * (beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)).mean()

    pairs = ((lambda z: reverse_kl(z, t, None, tau), rev_ref), (lambda z: jsd(z, t, None, tau, beta), jsd_ref))
    for ours, ref in pairs:
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        ours(a).backward()
        ref(b).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_jsd_is_symmetric_at_one_half_and_bounded_by_log_2():
    s, t = logits(3, 8, 21, seed=11), logits(3, 8, 21, seed=12)
    torch.testing.assert_close(jsd(s, t, None, 1.0, 0.5), jsd(t, s, None, 1.0, 0.5), rtol=1e-12, atol=1e-12)
    assert not torch.isclose(jsd(s, t, None, 1.0, 0.3), jsd(t, s, None, 1.0, 0.3))  # only at one half
    assert 0 < float(jsd(s, t, None, 1.0, 0.5)) < math.log(2)
    # disjoint supports reach the bound: each model sure of a different token
    a, b = torch.full((1, 2, 5), -1e4, dtype=torch.float64), torch.full((1, 2, 5), -1e4, dtype=torch.float64)
    a[..., 0], b[..., 1] = 0.0, 0.0
    torch.testing.assert_close(jsd(a, b, None, 1.0, 0.5), torch.tensor(math.log(2), dtype=torch.float64))
    # for any beta the bound is the binary entropy of beta
    beta = 0.2
    entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    torch.testing.assert_close(jsd(a, b, None, 1.0, beta), torch.tensor(entropy, dtype=torch.float64))
    assert float(jsd(s, t, None, 1.0, beta)) < entropy


def test_jsd_limits_at_beta_zero_and_one():
    s, t = logits(2, 5, 13, seed=13), logits(2, 5, 13, seed=14)
    mask = some_mask(2, 5, seed=3)
    fwd, rev = forward_kl(s, t, mask, 2.0), reverse_kl(s, t, mask, 2.0)
    # the ends are defined as the forward and reverse KL ...
    torch.testing.assert_close(jsd(s, t, mask, 2.0, 0.0), fwd)
    torch.testing.assert_close(jsd(s, t, mask, 2.0, 1.0), rev)
    # ... because those are the limits of JSD(beta) / beta and JSD(beta) / (1 - beta), while JSD itself vanishes
    eps = 1e-5
    torch.testing.assert_close(jsd(s, t, mask, 2.0, eps) / eps, fwd, rtol=1e-3, atol=0)
    torch.testing.assert_close(jsd(s, t, mask, 2.0, 1 - eps) / eps, rev, rtol=1e-3, atol=0)
    assert float(jsd(s, t, mask, 2.0, eps)) < 1e-3 * float(fwd)


@pytest.mark.parametrize("name", LOSSES)
def test_chunks_give_the_same_loss_and_gradient(name):
    s, t = logits(3, 10, 19, seed=15, dtype=torch.float32), logits(3, 10, 19, seed=16, dtype=torch.float32)
    mask = some_mask(3, 10, seed=4)
    whole, chunked = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = LOSSES[name](whole, t, mask, 2.0)
    b = LOSSES[name](chunked, t, mask, 2.0, chunk_size=4)  # several chunks, recomputed in backward
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole.grad, chunked.grad)
    with torch.no_grad():
        torch.testing.assert_close(LOSSES[name](s, t, mask, 2.0, chunk_size=3), a.detach())


def test_low_precision_logits_are_computed_in_float32():
    s, t = logits(2, 6, 300, seed=17, dtype=torch.bfloat16), logits(2, 6, 300, seed=18, dtype=torch.bfloat16)
    out = forward_kl(s, t, None, 2.0)
    assert out.dtype == torch.float32
    exact = forward_kl(s.double(), t.double(), None, 2.0)  # the same bf16 values, in float64
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_no_scored_position_gives_zero_not_nan():
    s = logits(2, 3, 7, seed=19).requires_grad_()
    out = forward_kl(s, logits(2, 3, 7, seed=20), torch.zeros(2, 3, dtype=torch.bool))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", LOSSES)
def test_tokens_without_mass_are_exact_zeros_not_nan(name):
    s, t = logits(2, 4, 9, seed=21), logits(2, 4, 9, seed=22)
    s[..., -1] = t[..., -1] = -math.inf  # a token neither model can produce (a masked vocabulary entry)
    s = s.requires_grad_()
    out = LOSSES[name](s, t, None, 1.3)
    out.backward()
    reference = LOSSES[name](s.detach()[..., :-1], t[..., :-1], None, 1.3)
    torch.testing.assert_close(out.detach(), reference)
    assert torch.isfinite(s.grad).all()


def test_argument_errors_say_what_is_wrong():
    s, t = logits(2, 3, 5), logits(2, 3, 6)
    with pytest.raises(ValueError, match="differ in shape"):
        forward_kl(s, t)
    with pytest.raises(ValueError, match="mask of shape"):
        forward_kl(s, s, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be a positive"):
        reverse_kl(s, s, None, 0.0)
    with pytest.raises(ValueError, match="0 <= beta <= 1"):
        jsd(s, s, None, 1.0, 1.5)
    with pytest.raises(ValueError, match="choose one of"):
        distill.divergence("kl", s, s)


# --- teacher, student and the objective -------------------------------------------------------
def tiny(vocab=40, seed=0, **changes) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
               init_std=0.1)
    return build_model(ModelConfig(**{**cfg, **changes}))


def token_batch(vocab=40, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    y[0, :3] = -100  # a prompt that is not trained on
    return x, y


def test_objective_mixes_distillation_and_data_loss_by_alpha():
    teacher, student = tiny(seed=1, n_layers=3, d_model=48), tiny(seed=2)
    x, y = token_batch()
    scored = y != -100
    with torch.no_grad():
        s, t = student(x).logits, teacher(x).logits
    kd = {name: LOSSES[name](s, t, scored, 2.0) for name in LOSSES}
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100)
    for name in LOSSES:
        for alpha in (0.0, 0.3, 1.0):
            loss, metrics = distill_objective(teacher, name, 2.0, alpha, 0.5)(student, (x, y))
            torch.testing.assert_close(loss, alpha * kd[name] + (1 - alpha) * ce, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(metrics["ce_loss"], ce, rtol=1e-5, atol=1e-6)
    # alpha = 0 is plain fine-tuning: the model's own next-token loss, without running the teacher
    loss, metrics = distill_objective(teacher, alpha=0.0)(student, (x, y))
    torch.testing.assert_close(loss, student(x, targets=y).loss, rtol=1e-5, atol=1e-6)
    assert "distill_loss" not in metrics


def test_gradients_reach_the_student_only_and_distillation_pulls_it_to_the_teacher():
    teacher, student = tiny(seed=3, n_layers=3), tiny(seed=4)
    teacher.train()
    objective = distill_objective(teacher, "forward_kl", temperature=1.0, alpha=1.0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, y = token_batch(seed=1)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = objective(student, (x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is None for p in teacher.parameters())
    assert losses[-1] < 0.2 * losses[0], losses[::8]


def test_sft_batches_keep_packed_conversations_apart():
    """A packed SFT row scores each conversation as if it were alone (chat_data's mask and positions)."""
    from lmlab.tune.chat_data import Example, collate

    teacher, student = tiny(seed=5), tiny(seed=6)
    g = torch.Generator().manual_seed(2)

    def example(n):
        ids = torch.randint(0, 40, (n,), generator=g).tolist()
        targets = ids[1:] + [-100]
        targets[: n // 3] = [-100] * (n // 3)
        return Example(ids, targets)

    a, b = example(9), example(7)
    objective = distill_objective(teacher, "jsd", temperature=1.5, alpha=0.6, beta=0.3)
    packed, _ = objective(student, collate([[a, b]], length=20))  # two conversations and padding in one row
    alone = [objective(student, collate([[e]]))[0] for e in (a, b)]
    n = [e.n_targets for e in (a, b)]
    expected = (alone[0] * n[0] + alone[1] * n[1]) / sum(n)  # both terms are means over the scored tokens
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)


def test_vocabularies_must_be_shared():
    assert shared_vocab_size(512, 512) == 512
    assert shared_vocab_size(500, 512, tokenizer_vocab=500) == 500  # the teacher's rows past 500 are padding
    assert shared_vocab_size(576, 512, tokenizer_vocab=500) == 512  # or the student's
    with pytest.raises(ValueError, match="pass the tokenizer's vocabulary size"):
        shared_vocab_size(500, 512)
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        shared_vocab_size(500, 512, tokenizer_vocab=510)

    teacher, student = tiny(vocab=48, seed=7), tiny(vocab=40, seed=8)
    x, y = token_batch()
    with pytest.raises(ValueError, match="same tokenizer"):
        distill_objective(teacher, alpha=1.0)(student, (x, y))
    # with the tokenizer's size given, the teacher's padding rows are left out: its distribution over the first 40
    loss, _ = distill_objective(teacher, alpha=1.0, vocab_size=40)(student, (x, y))
    with torch.no_grad():
        expected = forward_kl(student(x).logits, teacher(x).logits[..., :40], y != -100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_objective_rejects_bad_settings():
    teacher = tiny()
    for kwargs, match in (({"loss": "kl"}, "choose one of"), ({"temperature": -1.0}, "positive"),
                          ({"alpha": 1.5}, r"\[0, 1\]"), ({"beta": -0.1}, r"\[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            distill_objective(teacher, **kwargs)
    with pytest.raises(TypeError, match="SFT batch dict"):
        distill_objective(teacher)(tiny(), torch.zeros(2, 3, dtype=torch.long))


# --- sequence-level distillation -------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_tokenizer():
    from lmlab.tokenizer import Tokenizer

    text = ["The cat sat on the mat. What is two plus two? Two plus two is four.",
            "Tell me a story about a dog. Once upon a time a dog ran home."] * 20
    return Tokenizer.train(text, vocab_size=300, min_frequency=1, progress=False)


CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."},
     {"role": "assistant", "content": "Once upon a time."}, {"role": "user", "content": "About a dog?"},
     {"role": "assistant", "content": "A dog ran home."}],
    [{"role": "user", "content": "The cat sat?"}],  # no answer yet: the whole conversation is the prompt
]


def test_prompt_is_everything_before_the_last_assistant_turn():
    assert prompt_of(CONVERSATIONS[0]) == CONVERSATIONS[0][:1]
    assert prompt_of(CONVERSATIONS[1]) == CONVERSATIONS[1][:4]
    assert prompt_of(CONVERSATIONS[2]) == CONVERSATIONS[2]
    with pytest.raises(ValueError, match="no prompt"):
        prompt_of([{"role": "assistant", "content": "Hi"}])


def test_end_of_turn_ids_include_the_template_closing_token(chat_tokenizer):
    stops = end_of_turn_ids(chat_tokenizer)
    assert set(stops) == {chat_tokenizer.special_tokens["<|end|>"], chat_tokenizer.special_tokens["<|eos|>"]}


def test_teacher_generations_write_the_teachers_greedy_answers(chat_tokenizer, tmp_path):
    from lmlab.infer import SamplingParams, generate
    from lmlab.tune.chat_data import load_conversations

    teacher = tiny(vocab=chat_tokenizer.vocab_size, seed=9, init_std=0.3).eval()
    out = tmp_path / "teacher.jsonl"
    summary = teacher_generations(teacher, chat_tokenizer, CONVERSATIONS, out, max_new_tokens=6, batch_size=2,
                                  progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.written == len(records) == 3 and summary.skipped == 0
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=end_of_turn_ids(chat_tokenizer))
    truncated = 0
    for conversation, record in zip(CONVERSATIONS, records, strict=True):
        prompt = prompt_of(conversation)
        assert record["messages"][:-1] == prompt and record["messages"][-1]["role"] == "assistant"
        ids = chat_tokenizer.render_chat(prompt, add_generation_prompt=True)[0]
        (alone,) = generate(teacher, [ids], params, chat_tokenizer.decode)
        assert record["messages"][-1]["content"] == alone.text
        truncated += alone.finish_reason == "length"
    assert summary.truncated == truncated
    # the file is SFT data: the fine-tuning reader takes it and the template renders it with an assistant mask
    loaded = load_conversations(str(out))
    assert loaded == [r["messages"] for r in records]
    assert all(sum(chat_tokenizer.render_chat(m)[1]) >= 1 for m in loaded)


def test_teacher_generations_do_not_depend_on_the_batch_size(chat_tokenizer, tmp_path):
    teacher = tiny(vocab=chat_tokenizer.vocab_size, seed=10, init_std=0.3)
    for temperature in (0.0, 1.0):
        files = []
        for batch_size in (1, 3):
            files.append(tmp_path / f"t{temperature}_b{batch_size}.jsonl")
            teacher_generations(teacher, chat_tokenizer, CONVERSATIONS, files[-1], max_new_tokens=5,
                                temperature=temperature, batch_size=batch_size, seed=7, progress=False)
        assert files[0].read_text() == files[1].read_text()


def test_teacher_generations_stop_at_the_end_of_turn_and_respect_the_context(chat_tokenizer, tmp_path):
    end = chat_tokenizer.special_tokens["<|end|>"]

    class Terse(Transformer):
        """A teacher that always ends its turn at once."""

        def logits(self, h):
            out = super().logits(h)
            out[..., end] += 1e4
            return out

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=chat_tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                      max_seq_len=64)
    summary = teacher_generations(Terse(cfg), chat_tokenizer, CONVERSATIONS, tmp_path / "a.jsonl", progress=False)
    assert summary.empty == 3 and summary.truncated == 0

    # a context shorter than the longest prompt: that prompt is skipped, the others' answers end at the context
    from lmlab.infer import SamplingParams, generate

    prompts = [chat_tokenizer.render_chat(prompt_of(c), add_generation_prompt=True)[0] for c in CONVERSATIONS]
    context = sorted(map(len, prompts))[1] + 3
    short = tiny(vocab=chat_tokenizer.vocab_size, seed=11, max_seq_len=context, position="learned")
    summary = teacher_generations(short, chat_tokenizer, CONVERSATIONS, tmp_path / "b.jsonl", max_new_tokens=50,
                                  batch_size=1, progress=False)
    assert summary.skipped == 1 and summary.written == 2 and summary.truncated >= 1
    records = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    fitting = [i for i, ids in enumerate(prompts) if len(ids) < context]
    assert [r["messages"][:-1] for r in records] == [prompt_of(CONVERSATIONS[i]) for i in fitting]
    for i, record in zip(fitting, records, strict=True):
        room = context - len(prompts[i]) + 1  # the last token generated is never fed back
        params = SamplingParams(max_new_tokens=room, temperature=0.0, stop_token_ids=end_of_turn_ids(chat_tokenizer))
        (alone,) = generate(short, [prompts[i]], params, chat_tokenizer.decode)
        assert record["messages"][-1]["content"] == alone.text


def test_teacher_generations_reject_bad_input(chat_tokenizer, tmp_path):
    teacher = tiny(vocab=chat_tokenizer.vocab_size)
    out = tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="neither a list of messages"):
        teacher_generations(teacher, chat_tokenizer, ["hello"], out, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        teacher_generations(teacher, chat_tokenizer, CONVERSATIONS, out, max_new_tokens=0, progress=False)
    assert not out.exists()  # nothing half-written


def test_same_vocabulary(chat_tokenizer):
    from lmlab.tokenizer import Tokenizer

    assert same_vocabulary(chat_tokenizer, chat_tokenizer)
    other = Tokenizer.train(["completely different words here"] * 30, vocab_size=300, min_frequency=1,
                            progress=False)
    assert not same_vocabulary(chat_tokenizer, other)


# --- the command line -------------------------------------------------------------------------
QUICK = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.log_every=1", "--set",
         "train.sample_tokens=0", "--set", "train.threads=1", "--set", "data.seq_len=96", "--set", "data.limit=24",
         "--set", "data.pretrain_val_batches=1", "--no-progress"]


@pytest.fixture(scope="module")
def student(tiny_base, tmp_path_factory):
    """A smaller, untrained student with the teacher's (tiny_base's) tokenizer."""
    from lmlab.model import load, save_checkpoint
    from lmlab.tokenizer import tokenizer_files

    cfg = load(tiny_base).cfg
    path = tmp_path_factory.mktemp("student") / "student"
    small = tiny(vocab=cfg.vocab_size, seed=12, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                 max_seq_len=cfg.max_seq_len)
    save_checkpoint(small, path, tokenizer_files=tokenizer_files(tiny_base))
    return path


def _train_losses(run):
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_cli_token_mode_trains_on_the_teachers_logits(tiny_base, tiny_data, student, tmp_path, capsys):
    import shutil

    from lmlab.cli import main
    from lmlab.model import load
    from lmlab.model.hub import save_hf
    from lmlab.tokenizer import tokenizer_files

    chats = str(tiny_data["root"] / "synth" / "sft" / "train.jsonl")
    hf = tmp_path / "hf"  # the same weights as a Hugging Face checkpoint, read through the converter
    save_hf(load(tiny_base), hf)
    for f in tokenizer_files(tiny_base):
        shutil.copy(f, hf / f.name)
    # a model distilled into itself: pure distillation starts at exactly zero loss (plain SFT would not)
    for loss, teacher in (("forward_kl", tiny_base), ("jsd", hf)):
        run = tmp_path / f"self_{loss}"
        assert main(["distill", "--teacher", str(teacher), "--student", str(tiny_base), "--data", chats,
                     "--alpha", "1", "--loss", loss, "--temperature", "2", "--out", str(run), *QUICK]) == 0
        assert abs(_train_losses(run)[0]) < 1e-6
    # a real student: trains, reports, writes a checkpoint
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_base), "--student", str(student), "--data", chats,
                 "--out", str(run), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "teacher:" in out and "done: 2 steps" in out and "forgetting:" in out
    assert (run / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    assert _train_losses(run)[0] > 1.0  # the student starts far from the teacher and the data


def test_cli_sequence_mode_trains_on_the_teachers_answers(tiny_base, tiny_data, student, tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.model import load
    from lmlab.tokenizer import load_tokenizer
    from lmlab.tune.chat_data import load_conversations

    chats = tiny_data["root"] / "synth" / "sft" / "train.jsonl"
    run = tmp_path / "run"
    args = ["distill", "--mode", "sequence", "--teacher", str(tiny_base), "--student", str(student), "--data",
            str(chats), "--out", str(run), "--max-new-tokens", "6", "--set", "data.val_fraction=0.25", *QUICK]
    assert main(args) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    original = load_conversations(str(chats), limit=24)
    generated = load_conversations(str(run / "teacher_data.jsonl"))
    held = load_conversations(str(run / "held_out.jsonl"))
    assert len(held) == 6 and all(c in original for c in held)  # the held-out ones keep their real answers
    # the teacher answered every other prompt, in order, but those that fill its whole context
    tokenizer, context = load_tokenizer(tiny_base), load(tiny_base).cfg.max_seq_len
    prompts = [prompt_of(c) for c in original if c not in held]
    fitting = [p for p in prompts if len(tokenizer.render_chat(p, add_generation_prompt=True)[0]) < context]
    assert [prompt_of(c) for c in generated] == fitting and len(fitting) < len(prompts)
    info = json.loads((run / "teacher_data.json").read_text())
    assert info["written"] == len(fitting) and info["skipped"] == 18 - len(fitting) and info["max_new_tokens"] == 6
    # a rerun reuses the teacher's answers; other settings ask for --overwrite
    assert main([*args, "--generate-only"]) == 0
    assert "using the teacher's answers" in capsys.readouterr().out
    assert main([*args, "--resume", "--max-new-tokens", "7"]) == 1
    assert "generated from other settings" in capsys.readouterr().err


def test_cli_refuses_what_cannot_be_distilled(tiny_base, tiny_data, student, tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.model import load, save_checkpoint
    from lmlab.tokenizer import Tokenizer

    chats = str(tiny_data["root"] / "synth" / "sft" / "train.jsonl")
    other = tmp_path / "other"  # same size of vocabulary, other tokens
    tok = Tokenizer.train(["entirely different text, nothing alike"] * 50, vocab_size=512, min_frequency=1,
                          progress=False)
    tok.save(tmp_path / "tok")
    save_checkpoint(load(student), other, tokenizer_files=[tmp_path / "tok" / "tokenizer.json",
                                                           tmp_path / "tok" / "tokenizer_config.json"])
    base = ["distill", "--teacher", str(tiny_base), "--data", chats, "--out", str(tmp_path / "run"), *QUICK]
    cases = [(["--student", str(other)], "tokenizers of --teacher"),
             (["--student", str(student), "--generate-only"], "add --mode sequence"),
             (["--student", str(student), "--alpha", "1.5"], "--alpha must be in [0, 1]"),
             (["--student", str(tmp_path / "missing")], "is not a directory")]
    for extra, message in cases:
        assert main([*base, *extra]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()

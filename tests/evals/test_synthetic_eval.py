"""The held-out synthetic evaluations: prompts in the corpus's own pretraining formats, answers read
from the right place, exact scoring, and the batching of greedy completions."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmlab.data.synthetic import OPS, SynthConfig, arith_operands, generate, make_arith
from lmlab.evals import synthetic as ev
from lmlab.evals.synthetic import (
    ARITH_TASKS,
    complete,
    direct_prompt,
    evaluate_arithmetic,
    evaluate_qa,
    extract_answer,
    load_problems,
    mean_accuracy,
    reference,
    score,
    worked_prompt,
)

TRUTH = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "synth"
    generate(out, SynthConfig.from_size("tiny"), progress=False)
    return out


# --- scoring -------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ARITH_TASKS)
def test_the_corpus_own_completion_scores_and_any_other_number_does_not(task):
    rng = random.Random(0)
    for _ in range(60):
        a, b = make_arith(task, 4, rng).extra
        truth = TRUTH[task](a, b)
        for mode in ("worked", "direct"):
            prompt, completion = reference(task, mode, a, b)
            assert score(task, mode, a, b, completion), (prompt, completion)
            wrong = completion.replace(str(truth), str(truth + 1)) if mode == "direct" else \
                completion.replace(f"Answer: {truth}", f"Answer: {truth - 10}")
            assert not score(task, mode, a, b, wrong), wrong


def test_worked_answers_are_read_from_the_first_answer_line():
    _, done = reference("add", "worked", 2505, 7)
    assert done.endswith("So 2505 + 7 = 2512.\nAnswer: 2512")
    assert extract_answer("worked", done) == "2512"
    # a model that runs on into a new problem: its first Answer line is its answer to this one
    assert score("add", "worked", 2505, 7, done + "\nAdd 1 and 2.\nAnswer: 3")
    assert not score("add", "worked", 2505, 7, done.replace("Answer: 2512", "Answer: 2513") + "\nAnswer: 2512")
    assert extract_answer("worked", done.split("Answer:")[0]) is None  # cut short before answering
    assert not score("add", "worked", 2505, 7, done.split("Answer:")[0] + "2512")
    assert extract_answer("worked", "...\nAnswer: 2512.") == "2512"  # a final period is allowed
    assert extract_answer("worked", "...\nAnswer: 2512 apples") is None  # not an integer
    assert extract_answer("worked", "...\nAnswer: 25 12") is None
    assert extract_answer("worked", "...\nAnswer:\n2512") is None  # the number must be on the line


def test_direct_answers_are_the_rest_of_the_line_and_may_be_negative():
    assert score("sub", "direct", 64, 95, " -31\n12 - 5 = 7")
    assert not score("sub", "direct", 64, 95, " 31")
    assert not score("sub", "direct", 64, 95, "\n-31")  # the answer belongs on the prompt's line
    assert not score("add", "direct", 5, 7, " 12 13")
    assert not score("mul", "direct", 12, 3, " the answer")
    assert extract_answer("direct", " 36") == "36"
    assert score("mul", "direct", 12, 3, " 36")


def test_prompts_are_how_the_pretraining_text_writes_arithmetic(corpus):
    """Every worked document of the corpus is worked_prompt + its reference completion, and every
    drill line is direct_prompt + its reference completion: the model is asked in its own formats."""
    seen = {"worked": 0, "direct": 0}
    for line in (corpus / "pretrain" / "train.jsonl").read_text().splitlines():
        doc = json.loads(line)
        task, _, kind = doc["task"].partition("_")
        if kind == "worked":
            a, b = arith_operands(task, doc["text"].split("\n", 1)[0])
            assert worked_prompt(task, a, b) + reference(task, "worked", a, b)[1] == doc["text"]
            seen["worked"] += 1
        elif kind == "drill":
            for eq in doc["text"].split("\n"):
                a, b = (int(x) for x in eq.split(" = ")[0].split(f" {OPS[task]} "))
                assert direct_prompt(task, a, b) + reference(task, "direct", a, b)[1] == eq
                seen["direct"] += 1
    assert seen["worked"] > 10 and seen["direct"] > 100


def test_problems_load_from_the_held_out_files_in_order(corpus, tmp_path):
    for task in ARITH_TASKS:
        items = [json.loads(x) for x in (corpus / "eval" / f"{task}.jsonl").read_text().splitlines()]
        problems = load_problems(corpus / "eval", task, limit=5)
        assert problems == [arith_operands(task, x["prompt"]) for x in items[:5]]
        assert all(str(TRUTH[task](a, b)) == x["answer"] for (a, b), x in zip(problems, items, strict=False))
    with pytest.raises(FileNotFoundError, match="lmlab data synth"):
        load_problems(tmp_path, "add")
    (tmp_path / "add.jsonl").write_text('{"prompt": "Tell me a story."}\n')
    with pytest.raises(ValueError, match="not a add problem"):
        load_problems(tmp_path, "add")


# --- the evaluations, with a stand-in for the model --------------------------------------------------

class CharTokenizer:
    eos_ids = [0]

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_arithmetic_bookkeeping_with_an_oracle_that_errs_on_purpose(corpus, monkeypatch):
    """An oracle answers every problem right except those whose first operand is odd, on which it
    gives the right digits of the worked steps but a wrong final answer: the accuracies must be
    exactly the share of even first operands, per task and mode."""
    calls = []

    def oracle(model, tokenizer, prompts, budgets, **kw):
        calls.append((list(prompts), list(budgets), kw))
        out = []
        for p in prompts:
            task, mode, (a, b) = _parse(p)
            _, c = reference(task, mode, a, b)
            out.append(c if a % 2 == 0 else c.replace(str(TRUTH[task](a, b)), str(TRUTH[task](a, b) + 1)))
        return out

    monkeypatch.setattr(ev, "complete", oracle)
    results = evaluate_arithmetic(None, CharTokenizer(), corpus / "eval", limit=9, prefix_ids=[7], stop_token_ids=[0])
    assert len(calls) == 1 and calls[0][2]["prefix_ids"] == [7]  # one batched pass over every prompt
    assert [(r.task, r.mode) for r in results] == [(t, m) for t in ARITH_TASKS for m in ("worked", "direct")]
    for r in results:
        problems = load_problems(corpus / "eval", r.task, 9)
        assert r.n == len(problems) == 9 and r.answered == 9
        assert r.correct == sum(a % 2 == 0 for a, _ in problems)
        assert 0 < r.correct < 9  # the test would show nothing if all were odd or all even
    # budgets leave room for the corpus's own solution
    for prompt, budget in zip(*calls[0][:2], strict=True):
        task, mode, (a, b) = _parse(prompt)
        assert budget >= len(reference(task, mode, a, b)[1]) * 3 // 2
    assert mean_accuracy(results, "worked") == sum(r.accuracy for r in results if r.mode == "worked") / 3


def _parse(prompt: str):
    for task in ARITH_TASKS:
        if prompt.endswith(" =") and f" {OPS[task]} " in prompt:
            return task, "direct", tuple(int(x) for x in prompt[:-2].split(f" {OPS[task]} "))
        if prompt.endswith("\n") and (ops := arith_operands(task, prompt)) is not None:
            return task, "worked", ops
    raise AssertionError(prompt)


def test_questions_are_scored_by_the_corpus_verifier(corpus, monkeypatch):
    items = {t: [json.loads(x) for x in (corpus / "eval" / f"{t}.jsonl").read_text().splitlines()]
             for t in ("kv", "copy", "story_qa")}
    answer_of = {x["prompt"] + "\nAnswer:": x["answer"] for t in items for x in items[t]}

    def oracle(model, tokenizer, prompts, budgets, **kw):
        assert kw["stop"] == ["\n"]
        # right, but for every third prompt a wrong value
        return [f" {answer_of[p]}" if i % 3 else " zzz" for i, p in enumerate(prompts)]

    monkeypatch.setattr(ev, "complete", oracle)
    results = evaluate_qa(None, CharTokenizer(), corpus / "eval", limit=6)
    assert [r.task for r in results] == ["kv", "copy", "story_qa"]
    assert sum(r.n for r in results) == 18 and sum(r.correct for r in results) == 12
    # prompts longer than the context are left out before the limit is taken
    fits = [x for x in items["story_qa"] if len(x["prompt"] + "\nAnswer:") <= 580]
    assert 0 < len(fits) < len(items["story_qa"])
    (short,) = evaluate_qa(None, CharTokenizer(), corpus / "eval", tasks=["story_qa"], limit=50,
                           max_prompt_tokens=580)
    assert short.n == len(fits)
    (first,) = evaluate_qa(None, CharTokenizer(), corpus / "eval", tasks=["story_qa"], limit=2,
                           max_prompt_tokens=580, n_examples=2)
    assert [e["prompt"] for e in first.examples] == [x["prompt"] + "\nAnswer:" for x in fits[:2]]


# --- batched greedy completion against one prompt at a time --------------------------------------------

def test_complete_batches_by_budget_but_returns_each_prompt_its_own_greedy_completion():
    from lmlab.infer import SamplingParams
    from lmlab.infer import generate as generate_fn
    from lmlab.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=64)).eval()
    tok = CharTokenizer()
    prompts = ["ab", "hello there", "x", "12 + 5 =", "zz top"]
    budgets = [7, 2, 5, 1, 3]
    got = complete(model, tok, prompts, budgets, prefix_ids=[3], batch_size=2)
    for prompt, budget, text in zip(prompts, budgets, got, strict=True):
        (alone,) = generate_fn(model, [[3] + tok.encode(prompt)], SamplingParams(max_new_tokens=budget, temperature=0),
                               decode=tok.decode)
        assert text == alone.text and len(alone.token_ids) == budget
    assert [len(t) for t in got] != [0] * len(got)
    with pytest.raises(ValueError, match="2 max_new_tokens for 5 prompts"):
        complete(model, tok, prompts, [1, 2])

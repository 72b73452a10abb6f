"""The held-out arithmetic scorer: prompts in the corpus's own formats, exact scoring."""

from __future__ import annotations

import random

import pytest

from lmlab.data.synthetic import WORKED, arith_operands, make_arith, verify
from lmlab.evals.synthetic import ARITH_TASKS, direct_prompt, evaluate_arithmetic, load_problems, score, worked_prompt


@pytest.mark.parametrize("task", ARITH_TASKS)
def test_the_corpus_own_solution_scores_and_a_wrong_one_does_not(task):
    rng = random.Random(0)
    for _ in range(50):
        item = make_arith(task, 4, rng)
        a, b = arith_operands(task, item.prompt)
        truth = {"add": a + b, "sub": a - b, "mul": a * b}[task]
        assert verify(task, item.prompt, str(truth))  # the operands are read in the right order
        text, result = WORKED[task](a, b)
        prompt = worked_prompt(task, a, b)
        assert text.startswith(prompt) and result == truth
        assert score(task, "worked", a, b, text[len(prompt):])
        assert not score(task, "worked", a, b, text[len(prompt):].replace(f"Answer: {truth}", f"Answer: {truth + 1}"))
        assert not score(task, "worked", a, b, text[len(prompt):].split("Answer:")[0])  # no answer line
        assert score(task, "direct", a, b, f" {truth}\n{a} {direct_prompt(task, a, b)[-3]} 1 = 5")
        assert not score(task, "direct", a, b, f" {truth + 1}")
        assert not score(task, "direct", a, b, " the answer")


def test_subtraction_phrasing_reverses_the_operands():
    assert arith_operands("sub", "Subtract 95 from 64.") == (64, 95)
    assert arith_operands("sub", "What is 64 - 95?") == (64, 95)
    assert arith_operands("mul", "Multiply 12 by 3.") == (12, 3)
    assert arith_operands("add", "Tell me a story.") is None


def test_evaluate_counts_a_model_that_always_answers_right(tmp_path, monkeypatch):
    # a stand-in for generation that answers every prompt correctly shows the bookkeeping
    import importlib

    gen = importlib.import_module("lmlab.infer.generate")  # the module (the package re-exports a function of that name)
    from lmlab.data.synthetic import SynthConfig, generate

    generate(tmp_path / "synth", SynthConfig.from_size("tiny"), progress=False)

    class Tok:
        eos_ids = [0]

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    class Done:
        def __init__(self, text):
            self.text = text

    def oracle(model, prompts, params, decode=None):
        out = []
        for ids in prompts:
            p = decode(ids)
            for task in ARITH_TASKS:
                ops = arith_operands(task, p) if p.endswith("\n") else None
                if p.endswith(" ="):
                    a, op, b, _ = p.split(" ")
                    if {"+": "add", "-": "sub", "*": "mul"}[op] == task:
                        ops = (int(a), int(b))
                if ops:
                    text, _ = WORKED[task](*ops)
                    out.append(Done(text[len(p):] if p.endswith("\n") else f" {_}"))
                    break
        return out

    monkeypatch.setattr(gen, "generate", oracle)
    result = evaluate_arithmetic(None, Tok(), tmp_path / "synth/eval", limit=7)
    assert result.counts == {t: len(load_problems(tmp_path / "synth/eval", t, 7)) for t in ARITH_TASKS}
    assert all(v == 1.0 for mode in result.accuracy.values() for v in mode.values())
    assert result.mean("worked") == result.mean("direct") == 1.0

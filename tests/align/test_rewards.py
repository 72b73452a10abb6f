"""Rewards (lmlab/align/rewards.py): the final-number reader on tricky strings, every built-in checker against values
worked out by hand, named Python functions, the lazy reward-model wrapper (with a stub model), and the weighted sum."""

from __future__ import annotations

import math
import sys
import types

import pytest

from lmlab.align.rewards import (
    RewardSet,
    final_number,
    format_reward,
    length_reward,
    load_reward,
    number_reward,
    reference_number,
    sentiment_reward,
    synthetic_reward,
)

P = [[{"role": "user", "content": "q"}]]


@pytest.mark.parametrize("text, strict, flexible", [
    ("Answer: 1,234.", "1234", "1234"),
    ("The answer is $1,000.00.", "1000", "1000"),
    ("so she pays 3 + 4 = 7 dollars.\n#### 72", "72", "72"),
    ("Answer: 7 apples", "7", "7"),
    ("Answer: 12 or 13", None, None),  # two numbers in the statement: no answer, even flexibly
    ("So 3 + 4 = 7.\nAnswer: 7", "7", "7"),
    ("Answer: 5\nAnswer: 6", "6", "6"),  # the last statement counts
    ("The answer is 18.\nAnswer: 20", "20", "20"),
    ("Answer: 20\nthe answer is 18", "18", "18"),  # whichever statement comes last
    ("1068", "1068", "1068"),
    ("  -5. ", "-5", "-5"),
    ("0.50", "0.5", "0.5"),
    ("Answer: -0", "0", "0"),
    ("12 apples and 5 pears", None, "5"),  # no statement: only the flexible reading takes the last number
    ("Answer: none", None, None),
    ("", None, None),
    ("Answer:\n42", None, None),  # the statement's own line is empty
])
def test_final_number_on_tricky_strings(text, strict, flexible):
    assert final_number(text) == strict
    assert final_number(text, flexible=True) == flexible


def test_reference_number_reads_numbers_solutions_and_gsm8k():
    assert reference_number(1000) == "1000"
    assert reference_number(2.50) == "2.5"
    assert reference_number("1,000") == "1000"
    assert reference_number("Add 5 and 7.\n...\nSo 5 + 7 = 12.\nAnswer: 12") == "12"
    assert reference_number("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert reference_number(None) is None and reference_number(True) is None


def test_number_reward_compares_values_and_needs_the_answer_column():
    completions = ["Answer: 1,000", "1000.0", "The answer is 999.", "1000 or 1001", "no idea"]
    assert number_reward(P * 5, completions, answer=["1000"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'answer' field"):
        number_reward(P, ["1"], task=["add"])


def test_synthetic_reward_recomputes_the_truth_from_the_question():
    prompts = [[{"role": "user", "content": "What is 23 + 19?"}]] * 3 + [[{"role": "user", "content": "Subtract 8 "
                                                                                                      "from 30."}]]
    completions = ["42", "41", "So 23 + 19 = 42.\nAnswer: 42", "Answer: 22"]
    assert synthetic_reward(prompts, completions, task=["add"] * 3 + ["sub"]) == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'task' field"):
        synthetic_reward(prompts[:1], ["42"])


def test_format_and_ended_rewards():
    assert format_reward(P * 4, ["Answer: 3", "three", "The answer is 4.", "5"]) == [1.0, 0.0, 1.0, 1.0]
    ended = load_reward("ended")
    assert ended.fn(P * 2, ["a", "b"], ended=[True, False]) == [1.0, 0.0]


def test_sentiment_and_length_by_hand():
    # 3 words (counted as 10): (2 happy - 1 sad) * 10 / 10
    assert sentiment_reward(P, ["happy glad sad"]) == [1.0]
    # 20 words, 2 happy, 1 sad: 10 * 1 / 20
    text = "he was happy and she was glad but the dog was sad " + "x " * 8
    assert len(text.split()) == 20
    assert sentiment_reward(P, [text]) == [0.5]
    assert sentiment_reward(P, [""]) == [0.0]
    assert length_reward(5)(P * 3, ["a b c", "a b c d e", "a b c d e f g h i j"]) == [-0.4, 0.0, -1.0]
    assert load_reward("length=5").fn(P, ["a b c"]) == [-0.4]
    with pytest.raises(ValueError, match="positive"):
        load_reward("length=0")


def test_python_functions_by_file_and_by_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, **columns):\n    return [float(c.isupper()) for c in completions]\n")
    by_file = load_reward(f"{tmp_path / 'my_rewards.py'}:shout")
    assert by_file.fn(P * 2, ["HI", "hi"]) == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_reward("my_rewards:shout")
    assert by_module.fn(P, ["OK"]) == [1.0] and by_module.name == "my_rewards:shout"
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(FileNotFoundError):
        load_reward(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(ValueError, match="unknown reward 'nonsense'"):
        load_reward("nonsense")


def test_reward_model_is_loaded_lazily_and_scores_the_whole_conversation(tmp_path, monkeypatch):
    calls = {"load": 0, "conversations": None}

    class StubModel:
        def score(self, tokenizer, conversations, batch_size=16):
            calls["conversations"], calls["batch_size"] = conversations, batch_size
            return [float(len(c[-1]["content"])) for c in conversations]

    def load_reward_model(path, device="cpu"):
        calls["load"] += 1
        calls["path"] = path
        return StubModel(), "tokenizer"

    monkeypatch.setitem(sys.modules, "lmlab.align.reward", types.SimpleNamespace(load_reward_model=load_reward_model))
    reward = load_reward(f"rm:{tmp_path}", batch_size=4)
    assert calls["load"] == 0  # nothing is loaded until the first rollout is scored
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    assert reward.fn(prompts, ["abc", "de"]) == [3.0, 2.0]
    assert reward.fn(prompts, ["a", "b"]) == [1.0, 1.0]
    assert calls["load"] == 1 and calls["path"] == str(tmp_path) and calls["batch_size"] == 4
    assert calls["conversations"][0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(FileNotFoundError, match="lmlab reward"):
        load_reward(f"rm:{tmp_path / 'missing'}")


def test_reward_set_weights_sums_and_checks_what_functions_return():
    rewards = RewardSet.from_specs(["number", "format"], [1.0, 0.5])
    totals, parts = rewards.score(P * 3, ["Answer: 4", "Answer: 5", "four"], {"answer": ["4", "4", "4"]})
    assert totals == [1.5, 0.5, 0.0]
    assert parts == {"number": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert rewards.verifier == "number"
    assert RewardSet.from_specs(["format"]).verifier is None
    with pytest.raises(ValueError, match="one weight per function"):
        RewardSet.from_specs(["number", "format"], [1.0])
    with pytest.raises(ValueError, match="no reward function"):
        RewardSet([])
    short = RewardSet([load_reward("number")])
    short.rewards[0].fn = lambda prompts, completions, **c: [1.0]
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        short.score(P * 2, ["a", "b"], {})
    short.rewards[0].fn = lambda prompts, completions, **c: [math.nan]
    with pytest.raises(ValueError, match="not a finite number"):
        short.score(P, ["a"], {})


def test_gsm8k_prompts_and_the_number_checker_on_real_data(shared_data, monkeypatch):
    """GSM8K records become prompts whose `answer` is the final number; the reference solution itself, rewritten in the
    chain-of-thought form the evals ask for, scores 1, and the same text with its number changed scores 0."""
    from lmlab.align.rollout import load_prompts
    from lmlab.data.sources import records
    from lmlab.evals.tasks.gsm8k import reasoning

    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    prompts = load_prompts("gsm8k:train", limit=20)
    raw = list(records("gsm8k", "train", progress=False))[:20]
    assert [p.messages[-1]["content"] for p in prompts] == [r["question"] for r in raw]
    good = [f"{reasoning(r['answer'])} The answer is {r['final_answer']}." for r in raw]
    bad = [f"{reasoning(r['answer'])} The answer is {int(float(r['final_answer'])) + 1}." for r in raw]
    answers = [p.columns["answer"] for p in prompts]
    assert number_reward([p.messages for p in prompts], good, answer=answers) == [1.0] * 20
    assert number_reward([p.messages for p in prompts], bad, answer=answers) == [0.0] * 20
    # the full reference solutions ("... #### 72") read the same way
    assert number_reward([p.messages for p in prompts], [r["answer"] for r in raw], answer=answers) == [1.0] * 20

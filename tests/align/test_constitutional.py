"""Constitutional AI (lmlab.align.constitutional): the constitution file, the critique-and-revise loop, RLAIF's
position-swapped judging, the output formats, resume, and the whole pipeline through `lmlab cai` against a live
`lmlab serve` on a tiny checkpoint.

Most tests drive the pipeline with scripted Generators whose replies are a function of the chat they are asked,
so every expected record can be written down by hand.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmlab.align import constitutional as cai
from lmlab.align.constitutional import (
    Constitution,
    CritiqueConfig,
    PromptItem,
    RLAIFConfig,
    combine_orders,
    letter_logprobs,
    option_probability,
    orders_consistent,
)
from lmlab.evals.lm import EndpointError, per_prompt
from lmlab.infer.generate import Completion

CONSTITUTION = Constitution.load()
PROMPTS = [PromptItem(f"p{i}", [{"role": "user", "content": f"question {i}"}]) for i in range(8)]


class Scripted:
    """A deterministic Generator: reply(chat, params) -> text. Records every chat and its SamplingParams."""

    def __init__(self, reply, name: str = "scripted") -> None:
        self.reply, self.name = reply, name
        self.chats: list[list[dict]] = []
        self.params: list = []

    def generate(self, prompts, params):
        params = per_prompt(params, len(prompts))
        self.chats += [list(p) for p in prompts]
        self.params += params
        return [Completion([], self.reply(list(p), sp), "stop") for p, sp in zip(prompts, params, strict=True)]


CRITIQUES = {p.critique: p.name for p in CONSTITUTION.principles}
REVISIONS = {p.revision: p.name for p in CONSTITUTION.principles}


def reviser(chat: list[dict], params) -> str:
    """Answers "answer", critiques as "critique[principle] of <reply>", revises to "Revision: fixed<reply>"."""
    asked = chat[-1]["content"]
    if asked in CRITIQUES:
        return f"critique[{CRITIQUES[asked]}] of {chat[-2]['content']}"
    if asked in REVISIONS:
        return f"Revision: fixed<{chat[-4]['content']}>"
    return "answer"


# --- the constitution ----------------------------------------------------------------------------------------

def test_default_constitution_and_seeded_sampling():
    c = CONSTITUTION
    assert c.name == "lmlab-default" and len(c.principles) == 12 and len(c.examples) == 2
    assert len({p.name for p in c.principles}) == 12
    for p in c.principles:
        assert p.critique and p.revision and p.comparison.endswith("?")
    draws = [c.sample(random.Random(7)).name for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same principle
    rng = random.Random(0)
    counts = Counter(c.sample(rng).name for _ in range(12000))
    assert set(counts) == {p.name for p in c.principles}
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts  # uniform


@pytest.mark.parametrize("data, message", [
    ({"principles": []}, "has no principles"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r"}]},
     r"lacks the non-empty text field\(s\) \['comparison'\]"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r", "comparison": "q", "weight": 2}]},
     r"unknown field\(s\) \['weight'\]"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r", "comparison": "q"}] * 2}, "more than once"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r", "comparison": "q"}],
      "examples": [{"principle": "b", "prompt": "p", "response": "x", "critique": "c", "revision": "r"}]},
     "refers to the principle 'b'"),
])
def test_constitution_errors_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        Constitution.from_dict(data, "test")


def test_constitution_files(tmp_path):
    one = {"name": "one", "principles": [{"name": "a", "critique": "c?", "revision": "r.", "comparison": "q?"}]}
    (tmp_path / "c.json").write_text(json.dumps(one))
    assert Constitution.load(tmp_path / "c.json").principle("a").comparison == "q?"
    (tmp_path / "c.toml").write_text('name = "x"\n[[principles]]\nname = "a"\n')
    with pytest.raises(ValueError, match="lacks the non-empty text field"):
        Constitution.load(tmp_path / "c.toml")
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        Constitution.load(tmp_path / "bad.toml")
    (tmp_path / "c.yaml").write_text("name: x")
    with pytest.raises(ValueError, match="must be a .toml or .json file"):
        Constitution.load(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Constitution.load(tmp_path / "missing.toml")


# --- prompts -------------------------------------------------------------------------------------------------

def test_load_prompts_reads_every_form(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "dropped"}]},
        {"prompt": "plain"},
        {"prompt": "\n\nHuman: first\n\nAssistant: ok\n\nHuman: second\n\nAssistant:"},
        {"instruction": "do it", "input": "with this"},
        {"goal": "a goal", "id": 7},
        {"question": "why?", "responses": ["a", "b"]},
        {"prompt": "q", "chosen": "x", "rejected": "y"},
        {"prompt": "plain"},
    ]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    items = cai.load_prompts(str(f))
    assert [it.messages for it in items] == [
        [{"role": "user", "content": "hi"}], [{"role": "user", "content": "plain"}],
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "second"}],
        [{"role": "user", "content": "do it\n\nwith this"}], [{"role": "user", "content": "a goal"}],
        [{"role": "user", "content": "why?"}], [{"role": "user", "content": "q"}],
        [{"role": "user", "content": "plain"}]]
    assert items[4].id == "7" and items[5].responses == ("a", "b")
    assert items[7].id == items[1].id + "-2"  # a repeated prompt keeps a distinct, stable id
    assert items[1].id == cai.prompt_id([{"role": "user", "content": "plain"}])
    assert len(cai.load_prompts(str(f), limit=3)) == 3
    (tmp_path / "p.txt").write_text("one\n\n# a comment\ntwo\n")
    assert [it.messages[0]["content"] for it in cai.load_prompts(str(tmp_path / "p.txt"))] == ["one", "two"]
    redteam = cai.load_prompts("redteam")
    assert len(redteam) == 8 and redteam[0].messages[0]["content"].startswith("Write a phishing email")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, record 1 has no prompt"):
        cai.load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="neither a .jsonl/.json/.txt file, 'redteam'"):
        cai.load_prompts("no-such-dataset")


def test_hh_rlhf_red_team_prompts(shared_data, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    items = cai.load_prompts("hh-rlhf:test", subset="harmless-base", limit=5)
    assert len(items) == 5
    assert all(it.messages[-1]["role"] == "user" and it.messages[-1]["content"] for it in items)


# --- critique and revise -------------------------------------------------------------------------------------

def test_critique_revise_records_by_hand(tmp_path):
    model = Scripted(reviser)
    system = PromptItem("s", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}])
    result = cai.critique_revise(model, [PROMPTS[0], system], CONSTITUTION, CritiqueConfig(rounds=2, few_shot=1),
                                 out=tmp_path / "sft.jsonl", progress=False)
    assert result.n_new == 2 and not result.errors
    rec = result.records[0]
    p1, p2 = rec["principles"]
    assert rec == {"id": "p0", "messages": [{"role": "user", "content": "question 0"},
                                            {"role": "assistant", "content": "fixed<fixed<answer>>"}],
                   "initial": "answer",
                   "critiques": [f"critique[{p1}] of answer", f"critique[{p2}] of fixed<answer>"],
                   "revisions": ["fixed<answer>", "fixed<fixed<answer>>"], "principles": [p1, p2],
                   "model": "scripted"}
    # per prompt: the answer, then a critique and a revision in each of the 2 rounds
    assert len(model.chats) == 2 * (1 + 2 * 2)
    shots = cai._shots(CONSTITUTION, 1)
    assert len(shots) == 6 and shots[0]["content"] == CONSTITUTION.examples[0].prompt
    assert model.chats[0] == PROMPTS[0].messages  # the first answer is asked without examples
    revision_chat = next(c for c in model.chats if c[-1]["content"] in REVISIONS and c[-5]["content"] == "question 0"
                         and c[-4]["content"] == "answer")
    assert revision_chat == shots + [
        {"role": "user", "content": "question 0"}, {"role": "assistant", "content": "answer"},
        {"role": "user", "content": CONSTITUTION.principle(p1).critique},
        {"role": "assistant", "content": f"critique[{p1}] of answer"},
        {"role": "user", "content": CONSTITUTION.principle(p1).revision}]
    system_chat = next(c for c in model.chats if c[0]["role"] == "system" and len(c) > 2)
    assert system_chat[1:7] == shots  # examples after the system prompt, which stays first
    # the file is the records, and each is a fine-tuning chat
    lines = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert lines == result.records
    from lmlab.tune.chat_data import load_conversations, to_messages

    assert [to_messages(r) for r in lines] == [r["messages"] for r in lines]
    assert load_conversations(str(tmp_path / "sft.jsonl")) == [r["messages"] for r in lines]
    assert result.summary()["changed_rate"] == 1.0


def test_clean_revision_and_empty_revisions_keep_the_answer():
    assert cai.clean_revision("  Revision: the new reply ") == "the new reply"
    assert cai.clean_revision("Rewritten reply:\nok") == "ok"
    assert cai.clean_revision("A revision: keeps this") == "A revision: keeps this"
    model = Scripted(lambda chat, p: "Revision:" if chat[-1]["content"] in REVISIONS else "answer")
    rec = cai.critique_revise(model, PROMPTS[:1], CONSTITUTION, progress=False).records[0]
    assert rec["revisions"] == [""] and rec["messages"][-1]["content"] == "answer"


def test_principles_and_seeds_do_not_depend_on_batching_or_order():
    def run(prompts, batch_size, seed=0):
        model = Scripted(reviser)
        config = CritiqueConfig(rounds=2, batch_size=batch_size, seed=seed)
        recs = cai.critique_revise(model, prompts, CONSTITUTION, config, progress=False).records
        return sorted(recs, key=lambda r: r["id"]), model.params

    a, params = run(PROMPTS, 8)
    b, _ = run(PROMPTS[::-1], 1)
    assert a == b
    assert len({p.seed for p in params}) == len(params)  # every call of every prompt has its own seed
    c, _ = run(PROMPTS, 8, seed=1)
    assert [r["principles"] for r in a] != [r["principles"] for r in c]


def test_critique_revise_resumes_after_a_crash(tmp_path):
    out = tmp_path / "sft.jsonl"
    calls = {"n": 0}

    def crashing(chat, params):
        calls["n"] += 1
        if calls["n"] > 2 * 3:  # batch 1 (2 prompts x answer, critique, revision) succeeds, batch 2 dies
            raise RuntimeError("killed")
        return reviser(chat, params)

    with pytest.raises(RuntimeError, match="killed"):
        cai.critique_revise(Scripted(crashing), PROMPTS[:5], CONSTITUTION, CritiqueConfig(batch_size=2), out=out,
                            progress=False)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["p0", "p1"]
    with open(out, "a") as f:  # a crash in the middle of appending the next batch
        f.write('{"id": "p2", "messages": [{"role": "us')
    model = Scripted(reviser)
    resumed = cai.critique_revise(model, PROMPTS[:5], CONSTITUTION, CritiqueConfig(batch_size=2), out=out,
                                  progress=False)
    assert resumed.n_resumed == 2 and resumed.n_new == 3
    assert {c[0]["content"] for c in model.chats} == {"question 2", "question 3", "question 4"}
    fresh = cai.critique_revise(Scripted(reviser), PROMPTS[:5], CONSTITUTION, CritiqueConfig(batch_size=5),
                                progress=False)
    assert [json.loads(x) for x in out.read_text().splitlines()] == fresh.records
    again = cai.critique_revise(Scripted(reviser), PROMPTS[:5], CONSTITUTION, out=out, progress=False)
    assert again.n_new == 0 and again.n_resumed == 5
    assert cai.critique_revise(Scripted(reviser), PROMPTS[:1], CONSTITUTION, out=out, overwrite=True,
                               progress=False).records[0]["id"] == "p0"
    assert len(out.read_text().splitlines()) == 1


def test_an_endpoint_refusing_one_prompt_costs_that_prompt_only(tmp_path):
    class Refusing(Scripted):
        def generate(self, prompts, params):
            if any("question 1" in m["content"] for p in prompts for m in p):
                raise EndpointError("HTTP 400: context_length_exceeded")
            return super().generate(prompts, params)

    result = cai.critique_revise(Refusing(reviser), PROMPTS[:3], CONSTITUTION, out=tmp_path / "o.jsonl",
                                 progress=False)
    assert [r["id"] for r in result.records] == ["p0", "p2"]
    assert list(result.errors) == ["p1"] and "context_length_exceeded" in result.errors["p1"]
    assert result.summary()["n_failed"] == 1


# --- RLAIF ---------------------------------------------------------------------------------------------------

def test_preference_math_by_hand():
    assert option_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert option_probability(0.0, 0.0) == 0.5
    assert option_probability(1000.0, -1000.0) == 1.0 and option_probability(-1000.0, 1000.0) == 0.0
    assert combine_orders(0.8, 0.4) == pytest.approx(0.7)
    assert combine_orders(1.0, 1.0) == 0.5  # always "A": no preference
    assert combine_orders(0.8, None) is None
    assert orders_consistent(0.8, 0.4) and not orders_consistent(0.8, 0.7) and not orders_consistent(0.5, 0.1)
    top = [{"token": " A", "logprob": math.log(0.3)}, {"token": "A", "logprob": math.log(0.1)},
           {"token": "(B", "logprob": math.log(0.2)}, {"token": "x", "logprob": math.log(0.05)}]
    lp = letter_logprobs(top)
    assert lp["A"] == pytest.approx(math.log(0.4)) and lp["B"] == pytest.approx(math.log(0.2))
    assert letter_logprobs(top[:2] + top[3:])["B"] == pytest.approx(math.log(0.05))  # bounded by the last listed
    assert letter_logprobs([{"token": "x", "logprob": -1.0}]) is None
    assert cai.verdict_probability("tie") == 0.5 and cai.verdict_probability(None) is None


def options(chat: list[dict]) -> tuple[str, str]:
    m = re.search(r"\(A\) (.*)\n\n\(B\) (.*)\n\n", chat[-1]["content"], re.S)
    return m.group(1), m.group(2)


class LetterJudge(Scripted):
    """A judge that gives P(A) = prob(A, B) through option_logprobs, never by writing."""

    def __init__(self, prob) -> None:
        super().__init__(lambda chat, p: pytest.fail("the letter judge was asked to write"), "letters")
        self.prob = prob

    def option_logprobs(self, chats, letters):
        self.chats += chats
        out = []
        for chat in chats:
            p = self.prob(*options(chat))
            out.append({"A": math.log(p), "B": math.log(1 - p)})
        return out


GIVEN = [PromptItem(f"g{i}", [{"role": "user", "content": f"q{i}"}],
                    ("good reply", "bad reply") if i % 2 == 0 else ("bad reply", "good reply")) for i in range(4)]


def test_a_judge_that_always_says_a_gives_no_preference():
    for judge, method in ((Scripted(lambda chat, p: "Both are fine. [[A]]"), "generate"),
                          (LetterJudge(lambda a, b: 0.9), "logprobs")):
        result = cai.rlaif(judge, GIVEN, CONSTITUTION, RLAIFConfig(method=method), progress=False)
        s = result.summary()
        assert result.pairs == [] and s["status"] == {"tie": 4}, s
        assert s["agreement_between_orders"] == 0.0 and s["first_position_rate"] == 1.0
        assert s["mean_p_first"] == pytest.approx(1.0 if method == "generate" else 0.9)
        assert all(c["preference"] == pytest.approx(0.5) for c in result.comparisons)


def test_position_bias_is_cancelled_by_hand():
    # the judge prefers the good reply but also position A: P(A) = 0.8 when A is good, 0.4 when B is
    judge = LetterJudge(lambda a, b: 0.8 if a == "good reply" else 0.4)
    result = cai.rlaif(judge, GIVEN, CONSTITUTION, progress=False)
    assert len(judge.chats) == 2 * len(GIVEN)
    assert [p["id"] for p in result.pairs] == ["g0", "g1", "g2", "g3"]
    for pair in result.pairs:
        assert (pair["chosen"], pair["rejected"]) == ("good reply", "bad reply")
        assert pair["preference"] == pytest.approx(0.7)  # (0.8 + (1 - 0.4)) / 2
        assert pair["orders"] == {"chosen_first": pytest.approx(0.8), "chosen_second": pytest.approx(0.6)}
        assert pair["consistent"] and pair["method"] == "logprobs" and pair["policy"] == "given"
    c0 = result.comparisons[0]
    assert (c0["p_ab"], c0["p_ba"], c0["preference"]) == (pytest.approx(0.8), pytest.approx(0.4), pytest.approx(0.7))
    assert result.comparisons[1]["preference"] == pytest.approx(0.3)  # response 1 is the bad one there
    s = result.summary()
    assert s["agreement_between_orders"] == 1.0 and s["first_position_rate"] == 0.5  # each order picked the good one
    assert s["mean_p_first"] == pytest.approx(0.6)  # but the probabilities lean to the first position
    # both orders shown, with the principle's comparison question
    chat_ab, chat_ba = judge.chats[0], judge.chats[1]
    assert options(chat_ab) == ("good reply", "bad reply") and options(chat_ba) == ("bad reply", "good reply")
    assert CONSTITUTION.principle(c0["principle"]).comparison in chat_ab[0]["content"]


def test_inconsistent_orders_are_dropped_or_kept_with_a_soft_label():
    judge = LetterJudge(lambda a, b: 0.8 if a == "good reply" else 0.7)  # position bias beats content
    dropped = cai.rlaif(judge, GIVEN, CONSTITUTION, progress=False)
    assert dropped.pairs == [] and dropped.summary()["status"] == {"inconsistent": 4}
    assert [c["preference"] for c in dropped.comparisons] == [pytest.approx(0.55), pytest.approx(0.45)] * 2
    assert dropped.summary()["agreement_between_orders"] == 0.0
    kept = cai.rlaif(judge, GIVEN, CONSTITUTION, RLAIFConfig(keep_inconsistent=True), progress=False)
    assert [p["preference"] for p in kept.pairs] == [pytest.approx(0.55)] * 4  # (0.8 + (1 - 0.7)) / 2
    assert all(p["chosen"] == "good reply" and not p["consistent"] for p in kept.pairs)
    margin = cai.rlaif(judge, GIVEN, CONSTITUTION, RLAIFConfig(min_margin=0.1, keep_inconsistent=True),
                       progress=False)
    assert margin.pairs == [] and margin.summary()["status"] == {"tie": 4}


def test_written_verdicts_unparsed_and_identical():
    judge = Scripted(lambda chat, p: "[[A]]" if options(chat)[0] == "good reply" else "So: [[B]]")
    result = cai.rlaif(judge, GIVEN, CONSTITUTION, progress=False)  # auto: this judge has no logprobs
    assert [(p["chosen"], p["preference"], p["method"]) for p in result.pairs] == [("good reply", 1.0, "generate")] * 4
    assert result.comparisons[0]["judge_outputs"] == {"ab": "[[A]]", "ba": "So: [[B]]"}
    assert judge.params[0].temperature == 0.0
    with pytest.raises(ValueError, match="cannot give log-probabilities"):
        cai.rlaif(judge, GIVEN, CONSTITUTION, RLAIFConfig(method="logprobs"), progress=False)
    vague = cai.rlaif(Scripted(lambda chat, p: "hard to say"), GIVEN, CONSTITUTION, progress=False)
    assert vague.summary()["status"] == {"unparsed": 4} and vague.pairs == []
    same = Scripted(lambda chat, p: "[[A]]")
    items = [PromptItem("i", [{"role": "user", "content": "q"}], ("x", "x")),
             PromptItem("e", [{"role": "user", "content": "q"}], ("x", " "))]
    result = cai.rlaif(same, items, CONSTITUTION, progress=False)
    assert [c["status"] for c in result.comparisons] == ["identical", "empty"] and same.chats == []


def test_rlaif_samples_the_policy_and_writes_pairs_dpo_reads(tmp_path):
    from lmlab.align.preference import load_pairs, to_pair

    policy = Scripted(lambda chat, p: f"reply with seed {p.seed}", "policy")
    judge = LetterJudge(lambda a, b: 0.9 if a < b else 0.2)  # prefers the alphabetically smaller reply
    out = tmp_path / "pairs.jsonl"
    result = cai.rlaif(judge, PROMPTS, CONSTITUTION, RLAIFConfig(temperature=0.7, max_new_tokens=9), policy=policy,
                       out=out, progress=False)
    assert len(policy.chats) == 16 and all(p.temperature == 0.7 and p.max_new_tokens == 9 for p in policy.params)
    assert len({p.seed for p in policy.params}) == 16
    assert len(result.pairs) == 8 and all(p["chosen"] < p["rejected"] for p in result.pairs)
    assert all(p["preference"] == pytest.approx(0.85) and p["policy"] == "policy" for p in result.pairs)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == result.pairs
    for rec in lines:
        pair = to_pair(rec)
        assert pair.prompt == rec["messages"] and (pair.chosen, pair.rejected) == (rec["chosen"], rec["rejected"])
    assert len(load_pairs(str(out))) == 8
    comparisons = [json.loads(x) for x in cai.comparisons_path(out).read_text().splitlines()]
    assert [c["id"] for c in comparisons] == [p.id for p in PROMPTS]
    # a rerun asks nobody anything; pairs without their comparisons file cannot be resumed
    again = cai.rlaif(LetterJudge(lambda a, b: pytest.fail("asked")), PROMPTS, CONSTITUTION,
                      policy=Scripted(lambda c, p: pytest.fail("asked")), out=out, progress=False)
    assert again.n_new == 0 and again.n_resumed == 8 and len(again.pairs) == 8
    # a crash after a batch's pairs were written but before its comparisons: that batch is done again, once
    comparisons_file = cai.comparisons_path(out)
    comparisons_file.write_text("".join(line + "\n" for line in comparisons_file.read_text().splitlines()[:5]))
    judge.chats.clear()
    redo = cai.rlaif(judge, PROMPTS, CONSTITUTION, policy=policy, out=out, progress=False)
    assert redo.n_resumed == 5 and redo.n_new == 3 and len(judge.chats) == 2 * 3
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    assert [json.loads(x)["id"] for x in comparisons_file.read_text().splitlines()] == [p.id for p in PROMPTS]
    cai.comparisons_path(out).unlink()
    with pytest.raises(FileExistsError, match="cannot be resumed"):
        cai.rlaif(judge, PROMPTS, CONSTITUTION, policy=policy, out=out, progress=False)
    with pytest.raises(ValueError, match="no policy was given"):
        cai.rlaif(judge, PROMPTS, CONSTITUTION, progress=False)


# --- a real model as the judge -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_checkpoint(tiny_base, tmp_path_factory) -> Path:
    """tiny_base with a 1024-token context (RoPE has no position table), so judge prompts fit."""
    out = tmp_path_factory.mktemp("cai") / "tiny"
    shutil.copytree(tiny_base, out, ignore=shutil.ignore_patterns("train_state.pt"))
    config = json.loads((out / "config.json").read_text())
    config["max_seq_len"] = 1024
    (out / "config.json").write_text(json.dumps(config))
    return out


def first_token_logprobs(lm, chat) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([lm.prompt_ids(chat)])).logits[0, -1].float(), -1)


def top20(lm, chat) -> list[dict]:
    top = torch.topk(first_token_logprobs(lm, chat), 20)
    return [{"token": lm.tokenizer.decode([i]), "logprob": v}
            for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def test_checkpoint_judge_scores_the_letters_exactly(chat_checkpoint):
    from lmlab.evals.lm import LM

    lm = LM.from_dir(chat_checkpoint)
    chats = [cai.comparison_prompt(GIVEN[0].messages, "good reply", "bad reply", CONSTITUTION.principles[0]),
             cai.comparison_prompt(GIVEN[0].messages, "bad reply", "good reply", CONSTITUTION.principles[0])]
    scores = cai.option_logprobs(lm, chats)
    for chat, score in zip(chats, scores, strict=True):
        logp = first_token_logprobs(lm, chat)
        for letter in "AB":
            (token,) = lm.tokenizer.encode(letter, add_special_tokens=False)
            assert score[letter] == pytest.approx(logp[token].item(), abs=1e-5)
    result = cai.rlaif(lm, GIVEN[:2], CONSTITUTION, progress=False)
    assert all(c["method"] == "logprobs" and c["p_ab"] is not None for c in result.comparisons)


def test_cai_cli_against_lmlab_serve(chat_checkpoint, tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from lmlab.cli import main
    from lmlab.evals.lm import LM, OpenAIEndpoint
    from lmlab.infer.engine import Engine, EngineConfig
    from lmlab.infer.server import create_app, serve_in_thread
    from lmlab.model import load
    from lmlab.tokenizer import load_tokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me a story about {x}."}) + "\n"
                               for x in ("a cat", "a dog", "a fox")))
    engine = Engine(load(chat_checkpoint).eval(), load_tokenizer(chat_checkpoint),
                    EngineConfig(max_num_seqs=16, max_batch_tokens=512))
    with serve_in_thread(create_app(engine, model_name="tiny")) as running:
        url = running.url + "/v1"
        sft = tmp_path / "sft.jsonl"
        assert main(["cai", "critique-revise", "--prompts", str(prompts), "--model", url, "--model-name", "tiny",
                     "--out", str(sft), "--max-new-tokens", "12", "--rounds", "2", "--no-progress"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["n_records"] == 3 and summary["n_failed"] == 0
        from lmlab.tune.chat_data import load_conversations

        chats = load_conversations(str(sft))
        assert [c[0]["content"] for c in chats] == ["Tell me a story about a cat.", "Tell me a story about a dog.",
                                                    "Tell me a story about a fox."]
        assert all(len(json.loads(x)["revisions"]) == 2 for x in sft.read_text().splitlines())

        pairs = tmp_path / "pairs.jsonl"
        argv = ["cai", "rlaif", "--prompts", str(prompts), "--model", url, "--model-name", "tiny", "--judge", url,
                "--judge-model", "tiny", "--out", str(pairs), "--max-new-tokens", "12",
                "--judge-max-new-tokens", "8", "--no-progress"]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["n_prompts"] == 3 and summary["n_failed"] == 0
        comparisons = [json.loads(x) for x in cai.comparisons_path(pairs).read_text().splitlines()]
        assert len(comparisons) == 3
        assert sum(summary["status"].values()) == 3 and summary["n_pairs"] == summary["status"].get("kept", 0)
        from lmlab.align.preference import load_pairs

        if summary["n_pairs"]:
            assert len(load_pairs(str(pairs))) == summary["n_pairs"]
        assert main(argv) == 0  # a rerun resumes: nothing left to do
        assert json.loads(capsys.readouterr().out)["n_new"] == 0

        # the endpoint's letter probabilities are the served model's own. A tiny model puts "A" and "B" nowhere
        # near its top 20, so two of the tokens it does rank there stand in for the letters.
        lm = LM.from_dir(chat_checkpoint)
        chats = [cai.comparison_prompt(GIVEN[i].messages, *GIVEN[i].responses, CONSTITUTION.principles[i])
                 for i in range(3)]
        names = [e["token"].strip().strip("()[]*.:").strip() for e in top20(lm, chats[0])]
        letters = tuple(dict.fromkeys(n for n in names if n))[:2]
        assert len(letters) == 2
        got = cai.option_logprobs(OpenAIEndpoint(url, "tiny"), chats, letters)
        assert got[0] is not None
        for chat, value in zip(chats, got, strict=True):
            expected = letter_logprobs(top20(lm, chat), letters)
            if expected is None:
                assert value is None
            else:
                assert value == {k: pytest.approx(v, abs=1e-4) for k, v in expected.items()}
        assert cai.option_logprobs(OpenAIEndpoint(url, "tiny"), chats) == [None] * 3  # "A", "B" not in the top 20


def test_cli_usage_errors(tmp_path, capsys):
    from lmlab.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "q"}) + "\n")
    assert main(["cai", "rlaif", "--prompts", str(prompts), "--judge", str(tmp_path), "--out",
                 str(tmp_path / "o.jsonl")]) == 1
    assert "no --model was given" in capsys.readouterr().err
    given = tmp_path / "given.jsonl"
    given.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"]}) + "\n")
    assert main(["cai", "rlaif", "--prompts", str(given), "--judge", "http://127.0.0.1:1/v1", "--out",
                 str(tmp_path / "o.jsonl")]) == 1
    assert "name the model it serves with --judge-model" in capsys.readouterr().err
    assert main(["cai", "critique-revise", "--prompts", str(prompts), "--model", str(tmp_path), "--out",
                 str(tmp_path / "s.jsonl"), "--limit", "-1"]) == 1
    assert "--limit must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["cai", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "critique-revise" in text and "rlaif" in text and "Bai et al. 2022" in text

"""LLM-as-a-judge: parsing of ratings and verdicts, the both-orders combination against position bias (scripted
judges with known biases), agreement with labels against hand-computed kappas, file loading, reports, and the
mechanics with a real tiny lmlab model, directly and behind a live OpenAI-compatible server."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import pytest

from lmlab.evals.judge import (
    DEFAULT_RUBRIC,
    Answer,
    Pair,
    combine,
    compare,
    grade,
    grade_prompt,
    load_answers,
    load_pairs,
    normalize_label,
    pair_prompt,
    parse_rating,
    parse_verdict,
)
from lmlab.infer.generate import Completion


class Scripted:
    """A judge whose output is a function of the prompt's text; records every generate call."""

    def __init__(self, answer, name: str = "scripted") -> None:
        self.answer, self.name, self.calls = answer, name, []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        return [Completion(token_ids=[], text=self.answer(p[-1]["content"]), finish_reason="stop") for p in prompts]


def shown(text: str, who: str) -> str:
    m = re.search(rf"\[The Start of Assistant {who}'s Answer\]\n(.*?)\n\[The End of Assistant {who}'s Answer\]",
                  text, re.DOTALL)
    assert m, text
    return m.group(1)


def prefers_longer(text: str) -> str:
    a, b = len(shown(text, "A")), len(shown(text, "B"))
    return "The longer answer is better. " + ("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")


# Finals under the longer-answer judge, and labels, chosen for a hand-computed kappa (see the kappa test).
PAIRS = [
    Pair("q1", "a long answer", "short", label="A"),       # judge A, label A
    Pair("q2", "another long one", "brief", label="A"),    # judge A, label A
    Pair("q3", "tiny", "a much longer answer", label="B"),  # judge B, label B
    Pair("q4", "meh", "the longer of the two", label="A"),  # judge B, label A
    Pair("q5", "same", "size", label="tie"),               # judge tie, label tie
    Pair("q6", "longer answer here", "short", label="C"),  # judge A, label tie ("C" is a tie)
]


# --- parsing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rating", [
    ("The answer is correct and clear.\nRating: [[8]]", 8.0),
    ("Rating: 7", 7.0),
    ("Solid work. [[6]]", 6.0),
    ("Rating: [[7.5]]", 7.5),
    ("rating:   [[ 10 ]]", 10.0),
    ("Rating: 3/10", 3.0),
    ("I must answer as Rating: [[5]]; having thought more, Rating: [[9]]", 9.0),  # the last one is the verdict
    ("Rating: [[4]] and a stray [[9]]", 4.0),  # the explicit form wins over a bare [[N]]
    ("The answer is good, I would give it an eight.", None),
    ("Rating: [[11]]", None),
    ("Rating: [[0]]", None),
    ("", None),
    ("[[A]]", None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize("text, verdict", [
    ("Assistant A is more accurate. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally good. [[C]]", "tie"),
    ("[[ tie ]]", "tie"),
    ("Format: [[A]], [[B]] or [[C]]. My verdict: [[B]]", "B"),
    ("Assistant A is better.", None),
    ("[A]", None),
    ("Rating: [[7]]", None),
    ("", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_labels_and_combination():
    assert [normalize_label(x) for x in ("a", "model_b", "C", "Tie", "tie (bothbad)")] == ["A", "B", "tie", "tie",
                                                                                            "tie"]
    with pytest.raises(ValueError, match="'draw' is not a verdict"):
        normalize_label("draw")
    # (A, B) verdict and the (B, A) verdict already swapped back
    assert combine("A", "A") == "A" and combine("B", "B") == "B" and combine("tie", "tie") == "tie"
    assert combine("A", "B") == "tie" and combine("A", "tie") == "tie"
    assert combine(None, "A") is None and combine("B", None) is None


def test_prompts_hold_the_rubric_the_answers_in_order_and_the_reference():
    chat = pair_prompt("What is 2+2?", "four", "five", rubric="Be exact.", reference="4")
    text = chat[-1]["content"]
    assert [m["role"] for m in chat] == ["system", "user"]
    assert "Be exact." in text and shown(text, "A") == "four" and shown(text, "B") == "five"
    assert "[The Start of the Reference Answer]\n4\n" in text and "[[C]]" in text
    single = grade_prompt("Q?", "ans")[-1]["content"]
    assert DEFAULT_RUBRIC in single and "Rating: [[5]]" in single and "Reference" not in single
    with pytest.raises(ValueError, match="rubric is empty"):
        grade_prompt("Q?", "ans", rubric="  ")


# --- pairwise comparison with scripted judges --------------------------------------------------------------------

def test_a_judge_that_always_picks_the_first_position_yields_only_ties():
    judge = Scripted(lambda text: "Assistant A is better. [[A]]")
    report = compare(judge, PAIRS)
    assert len(judge.calls) == 1 and len(judge.calls[0][0]) == 2 * len(PAIRS)  # both orders, one batch
    assert judge.calls[0][1].temperature == 0  # greedy by default
    for r in report.results:
        assert (r.verdict_ab, r.verdict_ba, r.verdict_ba_swapped, r.final) == ("A", "A", "B", "tie")
        assert r.consistent is False
    s = report.summary()
    assert (s["win_rate"], s["tie_rate"], s["loss_rate"]) == (0.0, 1.0, 0.0)
    assert s["consistency_rate"] == 0.0 and s["first_position_rate"] == 1.0
    assert s["n_valid"] == 6 and s["n_unparsed"] == 0


def test_a_judge_that_prefers_the_longer_answer_finds_it_in_both_orders():
    report = compare(Scripted(prefers_longer), PAIRS)
    # the second prompt of each pair shows the answers swapped
    first, second = report.results[0].prompts
    assert shown(first[-1]["content"], "A") == "a long answer" and shown(second[-1]["content"], "A") == "short"
    assert [r.final for r in report.results] == ["A", "A", "B", "B", "tie", "A"]
    assert [(r.verdict_ab, r.verdict_ba) for r in report.results[:2]] == [("A", "B"), ("A", "B")]
    s = report.summary()
    assert s["win_rate"] == pytest.approx(3 / 6) and s["loss_rate"] == pytest.approx(2 / 6)
    assert s["tie_rate"] == pytest.approx(1 / 6)
    assert s["consistency_rate"] == 1.0
    assert s["first_position_rate"] == 0.5  # 5 decisive pairs, each picking first once and second once


def test_agreement_and_kappa_against_labels_match_hand_computation():
    # judge: A A B B tie A; labels: A A B A tie tie
    # with ties: p_o = 4/6; marginals judge (A3, B2, tie1), labels (A3, B1, tie2):
    #   p_e = (3*3 + 2*1 + 1*2) / 36 = 13/36, kappa = (24/36 - 13/36) / (23/36) = 11/23
    # without ties (pairs 1-4): p_o = 3/4; judge (A2, B2), labels (A3, B1): p_e = (6 + 2) / 16 = 1/2, kappa = 1/2
    agreement = compare(Scripted(prefers_longer), PAIRS).summary()["agreement"]
    assert agreement["with_ties"]["n"] == 6
    assert agreement["with_ties"]["agreement"] == pytest.approx(4 / 6)
    assert agreement["with_ties"]["kappa"] == pytest.approx(11 / 23)
    assert agreement["without_ties"]["n"] == 4
    assert agreement["without_ties"]["agreement"] == pytest.approx(3 / 4)
    assert agreement["without_ties"]["kappa"] == pytest.approx(0.5)
    # kappa is undefined (0/0) when judge and labels use one label throughout: None, so the report stays JSON
    same = compare(Scripted(prefers_longer), PAIRS[:2]).summary()["agreement"]["with_ties"]
    assert same == {"n": 2, "agreement": 1.0, "kappa": None}
    unlabelled = [Pair(p.question, p.answer_a, p.answer_b) for p in PAIRS]
    assert compare(Scripted(prefers_longer), unlabelled).summary()["agreement"] is None


def test_unparseable_outputs_are_counted_and_left_out_of_every_rate():
    # the (B, A) order of q1 and q2 gets no verdict; the rest follow the longer answer
    def judge(text: str) -> str:
        if shown(text, "B") in ("a long answer", "another long one"):
            return "I cannot decide."
        return prefers_longer(text)

    report = compare(Scripted(judge), PAIRS)
    assert [r.final for r in report.results] == [None, None, "B", "B", "tie", "A"]
    assert report.results[0].verdict_ab == "A" and report.results[0].verdict_ba is None
    s = report.summary()
    assert (s["n"], s["n_valid"], s["n_unparsed"], s["n_unparsed_outputs"]) == (6, 4, 2, 2)
    assert s["win_rate"] == pytest.approx(1 / 4) and s["loss_rate"] == pytest.approx(2 / 4)
    assert s["agreement"]["with_ties"]["n"] == 4


def test_pairwise_report_is_complete_json_and_markdown():
    report = compare(Scripted(prefers_longer, name="judge-x"), PAIRS, rubric="Prefer length.")
    d = json.loads(json.dumps(report.to_dict()))
    assert d["judge"] == "judge-x" and d["rubric"] == "Prefer length." and len(d["results"]) == 6
    row = d["results"][3]
    assert row["verdicts"] == {"ab": "B", "ba": "A", "ba_swapped": "B"} and row["final"] == "B"
    assert row["label"] == "A" and row["outputs"]["ab"].endswith("[[B]]")
    assert "Prefer length." in row["prompts"]["ab"][-1]["content"]
    md = report.to_markdown()
    assert "| 6 | 6 | 0 | 0.500 | 0.167 | 0.333 | 1.000 | 0.500 |" in md
    assert "| with ties | 6 | 0.667 | 0.478 |" in md and "| without ties | 4 | 0.750 | 0.500 |" in md
    assert "| 3 |  | q4 | B | B | B | A |" in md


# --- single-answer grading ---------------------------------------------------------------------------------------

def test_grade_parses_ratings_and_counts_the_unparseable():
    outputs = {"good": "Clear and right.\nRating: [[9]]", "ok": "Rating: 6", "bad": "It is an answer."}
    judge = Scripted(lambda text: outputs[re.search(r"\[The Start of the Answer\]\n(.*?)\n", text).group(1)])
    items = [Answer("q", "good", id="1"), Answer("q", "ok", reference="the truth"), Answer("q", "bad")]
    report = grade(judge, items, max_new_tokens=64)
    assert len(judge.calls) == 1 and judge.calls[0][1].max_new_tokens == 64
    assert [r.rating for r in report.results] == [9.0, 6.0, None]
    assert "the truth" in report.results[1].prompt[-1]["content"]
    s = report.summary()
    assert (s["n"], s["n_rated"], s["n_unparsed"], s["mean_rating"]) == (3, 2, 1, 7.5)
    assert s["stdev_rating"] == pytest.approx(2.1213203435596424)  # sample stdev of (9, 6): 3 / sqrt(2)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["results"][2] == {**d["results"][2], "rating": None, "output": "It is an answer."}
    md = report.to_markdown()
    assert "| 3 | 2 | 1 | 7.50 | 2.12 |" in md and "| 2 |  | q | unparsed |" in md


def test_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="no pairs"):
        compare(Scripted(prefers_longer), [])
    with pytest.raises(ValueError, match="no answers"):
        grade(Scripted(prefers_longer), [])


# --- files -------------------------------------------------------------------------------------------------------

def test_load_pairs_and_answers(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"question": "q", "answer_a": "x", "answer_b": "y", "label": "C", "id": 7},
            {"question": "r", "answer_a": "u", "answer_b": "v"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_pairs(path) == [Pair("q", "x", "y", label="tie", id="7"), Pair("r", "u", "v")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"question": "q", "answer_a": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 lacks the string field\(s\) \['answer_b'\]"):
        load_pairs(bad)
    bad.write_text(json.dumps({**rows[1], "label": "draw"}) + "\n")
    with pytest.raises(ValueError, match="item 1: label 'draw' is not a verdict"):
        load_pairs(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
        load_pairs(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question": "q", "answer": "a", "reference": "ref"}) + "\n")
    assert load_answers(answers) == [Answer("q", "a", reference="ref")]


# --- a real tiny model -------------------------------------------------------------------------------------------

def check_mechanics(report, pairs) -> None:
    """Every pair has two raw outputs and a verdict (or None) parsed from each; the counts add up."""
    assert len(report.results) == len(pairs)
    for r, pair in zip(report.results, pairs, strict=True):
        assert r.item == pair and len(r.outputs) == 2 and all(isinstance(o, str) for o in r.outputs)
        assert (r.verdict_ab, r.verdict_ba) == (parse_verdict(r.outputs[0]), parse_verdict(r.outputs[1]))
        assert shown(r.prompts[0][-1]["content"], "A") == shown(r.prompts[1][-1]["content"], "B") == pair.answer_a
    s = report.summary()
    # a tiny model rarely writes a verdict: what it fails to write is counted, not scored
    n_none = sum((r.verdict_ab is None) + (r.verdict_ba is None) for r in report.results)
    assert s["n_unparsed_outputs"] == n_none and s["n_valid"] + s["n_unparsed"] == len(pairs)
    json.dumps(report.to_dict())
    assert report.to_markdown().count("\n| ") >= len(pairs)


def test_compare_with_an_lmlab_model(tiny_base):
    from lmlab.evals.lm import LM

    judge = LM.from_dir(tiny_base)
    report = compare(judge, PAIRS[:3], max_new_tokens=12)
    check_mechanics(report, PAIRS[:3])
    assert report.judge == judge.name
    graded = grade(judge, [Answer("q", "a"), Answer("r", "b")], max_new_tokens=12)
    assert len(graded.results) == 2 and graded.summary()["n_rated"] + graded.n_unparsed == 2


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        reason = f"{module} is not installed (the `serve` extra); the endpoint test needs a live server"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must have it")
        pytest.skip(reason)


def test_compare_with_an_openai_compatible_endpoint(tiny_base, tmp_path):
    for module in ("fastapi", "uvicorn"):
        _require(module)
    from lmlab.evals.lm import OpenAIEndpoint
    from lmlab.infer.engine import Engine, EngineConfig
    from lmlab.infer.server import create_app, serve_in_thread
    from lmlab.model import load
    from lmlab.tokenizer import load_tokenizer

    # the judge prompt is longer than tiny_base's 128-token context: lengthen it (RoPE has no position table)
    checkpoint = tmp_path / "tiny"
    shutil.copytree(tiny_base, checkpoint, ignore=shutil.ignore_patterns("train_state.pt"))
    config = json.loads((checkpoint / "config.json").read_text())
    config["max_seq_len"] = 2048
    (checkpoint / "config.json").write_text(json.dumps(config))
    engine = Engine(load(checkpoint).eval(), load_tokenizer(checkpoint), EngineConfig(max_num_seqs=8, num_blocks=512))
    app = create_app(engine, model_name="tiny-judge", api_key="sk-judge")
    with serve_in_thread(app) as running:
        judge = OpenAIEndpoint(running.url, "tiny-judge", api_key="sk-judge")
        report = compare(judge, PAIRS[:2], max_new_tokens=8)
    check_mechanics(report, PAIRS[:2])
    assert report.judge == "tiny-judge"

"""The synthetic corpus: deterministic, atomic, every arithmetic step and answer correct, every
verifier agreeing with the generator (and rejecting the rejected answers), evaluation problems
absent from every training file, and stories whose pronouns and tense hold together."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.cli import main
from lmlab.data import sources, synthetic
from lmlab.data.synthetic import (
    DOC_SEPARATOR,
    EVAL_TASKS,
    Character,
    SynthConfig,
    generate,
    make_plot,
    render_story,
    verify,
    worked_add,
    worked_mul,
    worked_sub,
)

TINY = SynthConfig.from_size("tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate(out, TINY, progress=False)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _training(corpus: Path) -> dict[str, list[dict]]:
    return {rel: _jsonl(corpus / rel) for rel in ("pretrain/train.jsonl", "pretrain/val.jsonl", "sft/train.jsonl",
                                                   "sft/val.jsonl", "preference/train.jsonl", "preference/val.jsonl")}


# --- layout, manifest, determinism ----------------------------------------------------------------

def test_layout_and_manifest(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["version"] == synthetic.GENERATOR_VERSION
    assert manifest["config"] == TINY.to_dict()
    expected = {"pretrain/train.txt", "pretrain/val.txt", "pretrain/train.jsonl", "pretrain/val.jsonl",
                "sft/train.jsonl", "sft/val.jsonl", "preference/train.jsonl", "preference/val.jsonl",
                *(f"eval/{t}.jsonl" for t in EVAL_TASKS)}
    assert set(manifest["files"]) == expected
    on_disk = {str(p.relative_to(corpus)) for p in corpus.rglob("*") if p.is_file()}
    assert on_disk == expected | {"manifest.json"}
    for rel, info in manifest["files"].items():
        data = (corpus / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
        assert info["records"] == (data.count(b"\n") if rel.endswith(".jsonl") else
                                   data.count(f"\n{DOC_SEPARATOR}\n".encode()))
    n_val = round(TINY.n_pretrain * TINY.val_fraction)
    assert manifest["files"]["pretrain/train.jsonl"]["records"] == TINY.n_pretrain - n_val
    assert manifest["files"]["sft/val.jsonl"]["records"] == round(TINY.n_sft * TINY.val_fraction)
    assert all(manifest["files"][f"eval/{t}.jsonl"]["records"] == TINY.n_eval for t in EVAL_TASKS)


def test_txt_and_jsonl_hold_the_same_documents(corpus):
    for name in ("train", "val"):
        docs = [d["text"] for d in _jsonl(corpus / f"pretrain/{name}.jsonl")]
        txt = (corpus / f"pretrain/{name}.txt").read_text()
        assert txt == "".join(f"{d}\n{DOC_SEPARATOR}\n" for d in docs)
        assert not any(DOC_SEPARATOR in d for d in docs)
    tasks = {d["task"] for d in _jsonl(corpus / "pretrain/train.jsonl")}
    assert {"story", "story_qa", "kv", "copy", "add_worked", "mul_drill"} <= tasks


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, corpus):
    again = generate(tmp_path / "again", TINY, progress=False)
    first = json.loads((corpus / "manifest.json").read_text())
    assert again["files"] == first["files"]
    other = generate(tmp_path / "other", SynthConfig.from_size("tiny", seed=1), progress=False)
    assert all(other["files"][k]["sha256"] != v["sha256"] for k, v in first["files"].items())


def test_written_atomically_and_never_over_an_existing_directory(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(out, TINY, progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "eval_items", boom)  # fail after most files are written
    with pytest.raises(RuntimeError):
        generate(tmp_path / "new", TINY, progress=False)
    assert list(tmp_path.iterdir()) == [out]  # no half-written directory, no temporary left over


def test_config_errors():
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        SynthConfig.from_size("huge")
    with pytest.raises(ValueError, match="n_docs must be at least 1"):
        SynthConfig.from_size(n_docs=0)
    with pytest.raises(ValueError, match="val_fraction"):
        SynthConfig(val_fraction=1.5)
    assert SynthConfig.from_size(n_docs=1000).n_pretrain == 1000


# --- arithmetic: every step and every answer ---------------------------------------------------------

EQUATION = re.compile(r"(?<![\d-])(-?\d+(?: [-+*] \d+)+) = (-?\d+)")


def _check_equations(text: str) -> int:
    """Evaluate every `a op b [op c ...] = d` in `text`; return how many there were."""
    found = EQUATION.findall(text)
    for expr, value in found:
        assert eval(expr) == int(value), (expr, value, text)  # digits and + - * only, from the regex
    return len(found)


@given(st.integers(0, 10**7), st.integers(0, 10**7))
@settings(max_examples=300, deadline=None)
def test_worked_solutions_are_right_at_every_step(a, b):
    for op, worked in (("+", worked_add), ("-", worked_sub), ("*", worked_mul)):
        if op == "*":
            b_ = b % 10**4
            text, result = worked(a, b_)
            assert result == a * b_
        else:
            text, result = worked(a, b)
            assert result == (a + b if op == "+" else a - b)
        assert text.endswith(f"Answer: {result}")
        assert _check_equations(text) >= 1


def test_column_steps_carry_and_borrow():
    text, _ = worked_add(345, 78)
    assert "ones: 5 + 8 = 13, write 3 and carry 1" in text and "tens: 4 + 7 + 1 = 12, write 2 and carry 1" in text
    assert "hundreds: 3 + 1 = 4, write 4" in text
    text, result = worked_sub(1000, 1)
    assert result == 999 and text.count("borrow 1") == 3
    text, result = worked_mul(345, 78)
    assert "345 * 8 = 2760" in text and "345 * 70 = 24150" in text and result == 26910
    assert worked_add(58, 67, drop_carry=True)[1] == 15  # the rejected answers' classic mistake


def test_every_equation_in_the_corpus_is_true(corpus):
    n = 0
    for rows in _training(corpus).values():
        for row in rows:
            n += _check_equations(json.dumps(row, ensure_ascii=False).replace("\\n", "\n")
                                  if "rejected" not in row else row["prompt"] + "\n" + row["chosen"])
    assert n > 500


# --- verifiers --------------------------------------------------------------------------------------

def test_eval_answers_verify_and_perturbed_answers_do_not(corpus):
    rng = random.Random(0)
    for task in EVAL_TASKS:
        items = _jsonl(corpus / f"eval/{task}.jsonl")
        assert len(items) == TINY.n_eval and len({i["prompt"] for i in items}) == TINY.n_eval
        for item in items:
            assert item["task"] == task
            assert verify(task, item["prompt"], item["answer"]), item
            assert not verify(task, item["prompt"], _perturb(task, item["answer"], rng)), item


def _perturb(task: str, answer: str, rng: random.Random) -> str:
    if task in ("add", "sub", "mul"):
        return str(int(answer) + rng.choice((-1, 1, 10)))
    if task == "format" and answer.startswith("- "):
        return answer.replace("\n", ", ")
    if task == "format" and answer.isupper():
        return answer.lower()
    return answer + "x"


def test_verifiers_accept_worked_solutions_and_other_phrasings():
    assert verify("add", "What is 345 + 78?", worked_add(345, 78)[0])
    assert verify("sub", "Subtract 78 from 345.", "Answer: 267")
    assert not verify("sub", "Subtract 78 from 345.", "Answer: -267")
    assert verify("sub", "What is 78 minus 345? Answer with just the number.", "-267")
    assert verify("mul", "Multiply 345 by 78.", worked_mul(345, 78)[0])
    assert not verify("mul", "What is 345 * 78?", "I don't know")
    with pytest.raises(ValueError, match="no verifier for task 'story'"):
        verify("story", "Write a story.", "Once...")


def test_sft_examples_are_right(corpus):
    rows = _training(corpus)["sft/train.jsonl"] + _training(corpus)["sft/val.jsonl"]
    tasks = set()
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        tasks.add(row["task"])
        if row["task"] == "story":
            assert "thanked" in assistant["content"]
        else:
            assert verify(row["task"], user["content"], assistant["content"]), row
    assert tasks == {"story", *EVAL_TASKS}


def test_preference_winner_is_verifiable(corpus):
    rows = _training(corpus)["preference/train.jsonl"] + _training(corpus)["preference/val.jsonl"]
    assert {r["task"] for r in rows} == set(EVAL_TASKS)
    for r in rows:
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}] and r["reason"]
        assert verify(r["task"], r["prompt"], r["chosen"]), r
        assert not verify(r["task"], r["prompt"], r["rejected"]), r


# --- held-out problems never appear in training -------------------------------------------------------

ARITH = re.compile(r"(\d+) ([-+*]) (\d+)|Add (\d+) and (\d+)|Subtract (\d+) from (\d+)|Multiply (\d+) by (\d+)"
                   r"|(\d+) (plus|minus|times) (\d+)")


def _problems(text: str) -> set[tuple]:
    """Every arithmetic problem stated in `text`, as (op, a, b) with commutative ones sorted."""
    out = set()
    for m in ARITH.finditer(text):
        g = m.groups()
        if g[0]:
            op, a, b = g[1], g[0], g[2]
        elif g[3]:
            op, a, b = "+", g[3], g[4]
        elif g[5]:
            op, a, b = "-", g[6], g[5]
        elif g[7]:
            op, a, b = "*", g[7], g[8]
        else:
            op, a, b = {"plus": "+", "minus": "-", "times": "*"}[g[10]], g[9], g[11]
        a, b = int(a), int(b)
        out.add((op, *sorted((a, b))) if op in "+*" else (op, a, b))
    return out


def _all_text(rows: list[dict]) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False).replace("\\n", "\n") for r in rows)


def test_eval_problems_are_absent_from_every_training_file(tmp_path):
    corpus = tmp_path / "c"
    generate(corpus, SynthConfig(n_pretrain=3000, n_sft=800, n_preference=400, n_eval=100), progress=False)
    training = _all_text([r for rows in _training(corpus).values() for r in rows])
    train_problems = _problems(training)
    for task in ("add", "sub", "mul", "format"):
        for item in _jsonl(corpus / f"eval/{task}.jsonl"):
            if task != "format":
                (problem,) = _problems(item["prompt"])
                assert problem not in train_problems, item
    assert len(train_problems) > 4000  # the check is not vacuous (steps included)
    for task, marker in (("kv", "Remember these pairs:"), ("copy", "Repeat the following exactly:")):
        for item in _jsonl(corpus / f"eval/{task}.jsonl"):
            body = item["prompt"].split("\n\nQuestion:")[0]
            assert body.startswith(marker) and body not in training, item
    stories = 0
    for task in ("story_qa", "format"):
        for item in _jsonl(corpus / f"eval/{task}.jsonl"):
            story = item["prompt"].split("\n\nQuestion:")[0]
            if not story.startswith("Remember"):
                stories += 1
                assert story not in training, item
    assert stories > 150


def test_buckets_are_disjoint_and_sized():
    keys = [f"add:{a}:{b}" for a in range(200) for b in range(a, 200)]
    counts = {"train": 0, "validation": 0, "eval": 0}
    for k in keys:
        counts[synthetic.bucket(k)] += 1
    assert abs(counts["eval"] / len(keys) - synthetic.EVAL_SHARE) < 0.01
    assert abs(counts["validation"] / len(keys) - synthetic.VALIDATION_SHARE) < 0.01


# --- stories -------------------------------------------------------------------------------------------

PRONOUNS = re.compile(r"\b(he|she|him|her|his|hers|himself|herself)\b", re.I)


def test_every_pronoun_comes_from_its_character():
    """Render stories for characters with made-up pronouns: any he/she/his... left in the text would
    be a pronoun the grammar hard-coded, which could disagree with the character."""
    rng = random.Random(1)
    for i in range(400):
        hero = Character("Zed", "zorb", "ze", "zem", "zir", "zemself")
        helper = Character("Quin", "quark" if i % 2 else "girl", "qe", "qem", "qir", "qemself")
        plot = make_plot(rng, hero=hero, helper=helper)
        story = render_story(plot, rng)
        assert not PRONOUNS.search(story), story
        assert story.count("Zed") >= 4 and story.count("Quin") >= 2  # entities recur


def test_stories_are_past_tense_causal_and_varied():
    rng = random.Random(2)
    vocabulary = set()
    plots = set()
    for _ in range(600):
        plot = make_plot(rng)
        story = render_story(plot, rng)
        plots.add(plot.kind)
        assert "{" not in story and "}" not in story
        assert " because " in story and "So " in story and "Then " in story
        assert not re.search(r"\b(is|are|am|has|does|isn't|aren't)\b", story), story
        vocabulary |= set(re.findall(r"[a-z]+", story.lower()))
    assert plots == set(synthetic.PLOTS)
    assert len(vocabulary) > 500


def test_story_questions_are_answered_by_the_story():
    rng = random.Random(3)
    for _ in range(300):
        plot = make_plot(rng)
        story = render_story(plot, rng)
        for kind, truth in (("name", plot.hero.name), ("home", plot.home), ("helper", plot.helper.name),
                            ("color", plot.color)):
            question = synthetic.STORY_QUESTIONS[kind][0].format(kind=plot.hero.kind, N=plot.hero.name, obj=plot.obj)
            assert synthetic._story_answer(story, question) == truth, (question, story)
            prompt = story + synthetic.QUESTION_PREFIX + question
            assert verify("story_qa", prompt, truth) and verify("story_qa", prompt, f"Answer: the {truth}.")
            wrong = plot.helper.name if kind != "helper" else plot.hero.name
            assert not verify("story_qa", prompt, wrong)


# --- the registry source and the command line ------------------------------------------------------------

def test_registry_generates_on_first_use_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULT_SIZE", "tiny")
    docs = list(sources.texts("synthetic", "train"))
    cached = tmp_path / "synthetic" / str(sources.SYNTHETIC_SEED)
    assert docs == [d["text"] for d in _jsonl(cached / "pretrain/train.jsonl")]
    stamp = (cached / "manifest.json").stat().st_mtime_ns
    assert list(sources.texts("synthetic", "train")) == docs
    assert (cached / "manifest.json").stat().st_mtime_ns == stamp  # not regenerated
    (cached / "pretrain/train.jsonl").write_text('{"text": "tampered", "task": "story"}\n')
    assert list(sources.texts("synthetic", "train")) == docs  # regenerated from the seed
    evals = list(sources.records("synthetic", "eval-kv"))
    assert len(evals) == TINY.n_eval and all(verify("kv", r["prompt"], r["answer"]) for r in evals)
    assert sources.default_split(sources.SOURCES["synthetic"]) == "eval"


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["data", "synth", "--out", str(out), "--size", "tiny", "--seed", "3", "--no-progress"]) == 0
    assert "pretrain/train.txt" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    assert main(["data", "synth", "--out", str(out), "--size", "tiny", "--no-progress"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(out), "--n-docs", "50", "--overwrite", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["n_pretrain"] == 50
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", str(out), "--size", "tiny", "--n-docs", "5"])

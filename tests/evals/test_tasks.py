"""The benchmark tasks on the real data: prompts, few-shot selection, answer extraction and scoring."""

from __future__ import annotations

import math

import pytest

from lmlab.evals.tasks import get_task, task_names
from lmlab.evals.tasks.gsm8k import extract_flexible, extract_strict, normalize_number, reasoning
from lmlab.evals.tasks.multiple_choice import hellaswag_preprocess


@pytest.fixture(autouse=True)
def registry(shared_data, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))


def test_task_names_expand_groups_and_reject_unknown_names():
    assert task_names("arc,arc_easy,gsm8k") == ["arc_easy", "arc_challenge", "gsm8k"]
    with pytest.raises(ValueError, match="unknown task 'arcc'.*arc_easy"):
        task_names("arcc")
    with pytest.raises(ValueError, match="no task"):
        task_names(" , ")


def test_cli_help_lists_every_registered_task():
    from lmlab.cli import EVAL_GROUPS, EVAL_TASKS
    from lmlab.evals.tasks import GROUPS, TASKS

    assert EVAL_TASKS.split(", ") == list(TASKS)
    assert EVAL_GROUPS.split(", ") == list(GROUPS)


def test_benchmark_sizes():
    sizes = {"mmlu": 14079, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "truthfulqa_mc1": 817,
             "gsm8k": 1319, "humaneval": 164, "mbpp": 500}
    for name, n in sizes.items():
        assert len(get_task(name).docs()) == n, name
    subjects = {d["subject"] for d in get_task("mmlu").docs()}
    assert len(subjects) == 57


def test_mmlu_prompt_is_five_shot_from_the_subjects_dev_questions_in_order():
    task = get_task("mmlu")
    docs = task.docs()
    doc = next(d for d in docs if d["subject"] == "anatomy")
    prompt = task.fewshot_context(0, doc, 5, seed=1)
    dev = [d for d in task.fewshot_docs() if d["subject"] == "anatomy"]
    assert len(dev) == 5
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    first = dev[0]
    assert (f"{first['question'].strip()}\nA. {first['choices'][0]}\nB. {first['choices'][1]}\n"
            f"C. {first['choices'][2]}\nD. {first['choices'][3]}\nAnswer: {'ABCD'[first['answer']]}\n\n") in prompt
    assert prompt.endswith(task.doc_to_text(doc)) and task.doc_to_text(doc).endswith("\nAnswer:")
    assert prompt.count("\nAnswer:") == 6
    at = [prompt.index(d["question"].strip()) for d in dev]
    assert at == sorted(at)
    assert task.continuations(doc) == [" A", " B", " C", " D"]
    # --limit is per subject, as lm-evaluation-harness limits each subject's subtask
    limited = task.select(docs, 2)
    assert len(limited) == 2 * 57
    assert "high school biology" in task.doc_description(next(d for d in docs if d["subject"] == "high_school_biology"))


def test_fewshot_examples_are_seeded_per_document_and_never_the_document_itself():
    task = get_task("arc_easy")
    docs = task.docs()
    a = task.examples(7, docs[7], 5, seed=3)
    assert a == task.examples(7, docs[7], 5, seed=3)  # reproducible
    assert a != task.examples(7, docs[7], 5, seed=4)  # the seed matters
    assert a != task.examples(8, docs[8], 5, seed=3)
    assert docs[7] not in a and len(a) == 5
    # whatever happened before: a fresh task gives the same examples
    assert get_task("arc_easy").examples(7, docs[7], 5, seed=3) == a
    prompt = task.fewshot_context(7, docs[7], 2, seed=3)
    assert prompt == "".join(f"Question: {e['question']}\nAnswer: {e['choices'][e['answer']]}\n\n" for e in a[:2]) + \
        f"Question: {docs[7]['question']}\nAnswer:"


def test_hellaswag_cleaning():
    assert hellaswag_preprocess(" Cooking: [header] How to boil [title] an egg  ") == "Cooking: How to boil. an egg"
    task = get_task("hellaswag")
    doc = task.docs()[0]
    assert task.doc_to_text(doc) == hellaswag_preprocess(doc["context"])
    assert len(task.choices(doc)) == 4 and task.gold(doc) == doc["label"]


def test_multiple_choice_scoring_acc_and_acc_norm_by_characters():
    task = get_task("arc_easy")
    doc = {"question": "q", "choices": ["a", "a much longer answer"], "answer": 1}
    # raw: choice 0 wins (-2 > -6); per character: -2/1 = -2 < -6/20 = -0.3, choice 1 wins
    s = task.score(doc, [-2.0, -6.0])
    assert (s["acc"], s["acc_norm"], s["pred"]) == (0.0, 1.0, 0)
    assert s["confidence"] == pytest.approx(1 / (1 + math.exp(-4)))
    assert s["gold_prob"] == pytest.approx(math.exp(-6) / (math.exp(-2) + math.exp(-6)))


def test_truthfulqa_mc2_is_the_normalized_mass_on_true_answers():
    task = get_task("truthfulqa_mc2")
    doc = task.docs()[0]
    labels = doc["mc2_targets"]["labels"]
    lls = [-1.0 - i for i in range(len(labels))]
    want = sum(math.exp(ll) for ll, t in zip(lls, labels, strict=True) if t) / sum(math.exp(ll) for ll in lls)
    assert task.score(doc, lls)["acc"] == pytest.approx(want)
    mc1 = get_task("truthfulqa_mc1")
    assert mc1.gold(mc1.docs()[0]) == 0 and mc1.max_shots == 0
    assert mc1.doc_to_text(doc).startswith("Q: What is human life expectancy") and mc1.doc_to_text(doc).endswith("\nA:")


@pytest.mark.parametrize("text,want", [
    ("The answer is 1,234.", "1234"), ("#### -5", "-5"), ("The answer is $18.00.", "18"), ("so 3.50", None),
])
def test_gsm8k_strict_extraction(text, want):
    assert extract_strict(text) == want


def test_gsm8k_flexible_extraction_and_normalization():
    assert extract_flexible("first 3 then 4 and finally $1,000.") == "1000"
    assert extract_flexible("no number") is None
    assert normalize_number("0.0") == "0" and normalize_number("007") == "7" and normalize_number("1e3") == "1000"
    assert normalize_number("abc") is None


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_reference_solutions_score_100_percent(split):
    from lmlab.data.sources import records

    task = get_task("gsm8k")
    docs = list(records("gsm8k", split, download=False, progress=False))
    assert len(docs) in (7473, 1319)
    # the raw reference solution ("... #### 72") and its chain-of-thought form ("... The answer is 72.")
    raw = [task.score(d, d["answer"])["exact_match"] for d in docs]
    cot = [task.score(d, task.doc_to_target(d))["exact_match"] for d in docs]
    assert sum(raw) == len(docs) and sum(cot) == len(docs)
    assert all("<<" not in reasoning(d["answer"]) for d in docs[:200])


def test_gsm8k_prompt_is_eight_shot_chain_of_thought_from_train():
    task = get_task("gsm8k")
    doc = task.docs()[0]
    prompt = task.fewshot_context(0, doc, 8, seed=1234)
    assert prompt.count("Question: ") == 9 and prompt.count("The answer is ") == 8
    assert prompt.endswith(f"Question: {doc['question']}\nAnswer:")
    direct = get_task("gsm8k", cot=False)
    assert direct.doc_to_target(doc) == f"The answer is {doc['final_answer']}."


def test_code_task_prompts():
    he = get_task("humaneval")
    doc = he.docs()[0]
    assert he.fewshot_context(0, doc, 0, 0) == doc["prompt"]
    mbpp = get_task("mbpp")
    doc = mbpp.docs()[0]
    prompt = mbpp.fewshot_context(0, doc, 3, 0)
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3
    assert prompt.startswith("You are an expert Python programmer, and here is your task: ")
    assert prompt.endswith("[BEGIN]\n") and doc["test_list"][0] in prompt


def test_synthetic_tasks_score_their_own_references(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(tmp_path))  # the synthetic corpus is generated on first use
    for name in task_names("synthetic"):
        for cot in (True, False):
            task = get_task(name, cot=cot)
            docs = task.docs()[:20]
            assert docs, name
            assert all(task.score(d, task.doc_to_target(d))["exact_match"] == 1.0 for d in docs), (name, cot)
            assert task.score(docs[0], " nonsense")["exact_match"] == 0.0

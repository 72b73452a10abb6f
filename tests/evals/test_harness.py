"""The harness end to end on a tiny model: results record, sampling, self-consistency, test-time compute
curves, perturbations, contamination, the command line."""

from __future__ import annotations

import json

import pytest

from lmlab.evals.harness import EvalConfig, evaluate, helm_table, markdown_table, write_results
from lmlab.evals.lm import LM
from lmlab.evals.perturb import perturber


@pytest.fixture(autouse=True)
def registry(shared_data, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))


@pytest.fixture(scope="module")
def lm(tiny_base):
    return LM.from_dir(tiny_base, batch_size=8)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature 0 would repeat"):
        EvalConfig(tasks=["gsm8k"], samples=4)
    with pytest.raises(ValueError, match="unknown perturbation 'typo'"):
        EvalConfig(tasks=["arc_easy"], perturbations=["typo"])
    with pytest.raises(ValueError, match="--limit 0"):
        EvalConfig(tasks=["arc_easy"], limit=0)
    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(tasks=["arc_eazy"])


def test_multiple_choice_record(lm, tmp_path):
    record = evaluate(lm, EvalConfig(tasks=["arc_easy", "mmlu"], limit=3, perturbations=["lowercase"]),
                      progress=False)
    arc = record["results"]["arc_easy"]
    assert arc["n"] == 3 and arc["shots"] == 0 and arc["metric"] == "acc_norm"
    samples = record["samples"]["arc_easy"]
    assert [s["acc"] for s in samples] == [float(s["pred"] == s["gold"]) for s in samples]
    assert arc["acc"] == pytest.approx(sum(s["acc"] for s in samples) / 3)
    assert all(len(s["loglikelihoods"]) == len(s["choices"]) for s in samples)
    mmlu = record["results"]["mmlu"]
    assert mmlu["n"] == 3 * 57 and mmlu["shots"] == 5
    assert len(record["groups"]["mmlu"]) == 57 and all(g["n"] == 3 for g in record["groups"]["mmlu"].values())
    helm = record["helm"]["arc_easy"]
    assert 0 <= helm["ece"] <= 1 and helm["tokens_per_second"] > 0 and "lowercase" in helm["robustness"]
    path = write_results(record, tmp_path / "r.json")
    back = json.loads(path.read_text())
    assert back["config"]["tasks"] == ["arc_easy", "mmlu"] and back["samples"]["arc_easy"][0]["prompt"]
    table = markdown_table(record)
    assert "| arc_easy | 0 | 3 | acc_norm |" in table and "| mmlu | 5 | 171 | acc |" in table
    assert "| arc_easy | acc_norm |" in helm_table(record)


def test_generation_with_samples_gives_self_consistency_and_curves(lm, tmp_path):
    from lmlab.evals.testtime import plot_scaling, scaling_curves, task_curves

    record = evaluate(lm, EvalConfig(tasks=["gsm8k"], limit=2, shots=1, samples=4, temperature=1.0),
                      progress=False)
    rows = record["samples"]["gsm8k"]
    assert len(rows) == 2 and all(len(r["outputs"]) == 4 for r in rows)
    assert "maj@4" in record["results"]["gsm8k"]
    again = evaluate(lm, EvalConfig(tasks=["gsm8k"], limit=2, shots=1, samples=4, temperature=1.0), progress=False)
    assert [r["outputs"] for r in again["samples"]["gsm8k"]] == [r["outputs"] for r in rows]  # seeded
    curves = scaling_curves(record)
    assert [k for k, _ in curves["gsm8k"]["maj"]] == [1, 2, 4]
    plot_scaling(curves, tmp_path / "tt.png")
    assert (tmp_path / "tt.png").read_bytes()[:4] == b"\x89PNG"
    # hand-made samples: 3 documents x 4 samples with answers and correctness
    def doc(answers, gold):
        return {"sample_scores": [{"answer": a, "exact_match": float(a == gold)} for a in answers]}
    rows = [doc(["1", "2", "2", "2"], "2"), doc(["5", "6", "7", "5"], "7"), doc(["9", "9", "9", "9"], "3")]
    c = task_curves(rows, verifier_scores=[[0, 1, 0, 0], [0, 0, 5, 0], [1, 1, 1, 1]])
    assert dict(c["maj"])[4] == pytest.approx(1 / 3)  # 2 wins the vote in doc 0; 5 in doc 1 (wrong)
    assert dict(c["best_of"])[4] == pytest.approx(2 / 3)  # the verifier finds 2 and 7
    assert dict(c["pass"])[4] == pytest.approx(2 / 3) and dict(c["pass"])[1] == pytest.approx((3 / 4 + 1 / 4) / 3)


def test_synthetic_tasks_through_the_engine(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(tmp_path))
    record = evaluate(lm, EvalConfig(tasks=["synthetic_add", "synthetic_kv"], limit=4), progress=False)
    for name in ("synthetic_add", "synthetic_kv"):
        assert record["results"][name]["n"] == 4
        for s in record["samples"][name]:
            assert s["prompt"] and isinstance(s["outputs"][0], str)


def test_contamination_marks_documents_seen_in_training(lm, tmp_path):
    from lmlab.evals.tasks import get_task

    docs = get_task("arc_easy").docs()[:4]
    train = tmp_path / "train.jsonl"
    # the training data holds document 1 verbatim, with its answer
    text = get_task("arc_easy").doc_text_for_contamination(docs[1])
    train.write_text(json.dumps({"text": "some unrelated words here. " + text}) + "\n")
    record = evaluate(lm, EvalConfig(tasks=["arc_easy"], limit=4, contamination=[str(train)]), progress=False)
    flags = [s["contaminated"] for s in record["samples"]["arc_easy"]]
    assert flags == [False, True, False, False]
    assert record["helm"]["arc_easy"]["contamination_percent"] == pytest.approx(25.0)


def test_perturbations_keep_the_answer_cue_and_are_seeded():
    typos = perturber("typos", seed=0)
    text = "Question: Which planet is known as the red planet in our solar system?\nAnswer:"
    out = typos(3, text)
    assert out.endswith("\nAnswer:") and out != text and out == typos(3, text)
    assert perturber("uppercase")(0, text) == text.split("\n")[0].upper() + "\nAnswer:"
    assert perturber("lowercase")(0, "No Cue Here") == "no cue here"


def test_eval_command(tiny_base, tmp_path, capsys):
    from lmlab.cli import main

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little dog.")
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(tiny_base), "--tasks", "arc_easy", "--limit", "2", "--text", str(text),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| arc_easy | 0 | 2 | acc |" in printed and "bits per byte" in printed
    record = json.loads(out.read_text())
    assert record["results"]["arc_easy"]["n"] == 2 and record["perplexity"][0]["bits_per_byte"] > 0
    assert main(["eval", "--model", str(tiny_base)]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err


def test_eval_command_test_time_compute(tiny_base, tmp_path, capsys):
    from lmlab.cli import main

    out, plot = tmp_path / "tt.json", tmp_path / "tt.png"
    assert main(["eval", "--model", str(tiny_base), "--tasks", "gsm8k", "--limit", "2", "--shots", "0",
                 "--samples", "2", "--temperature", "1.0", "--verifier", "self", "--plot", str(plot),
                 "--out", str(out)]) == 0
    curves = json.loads(out.read_text())["test_time_compute"]["gsm8k"]
    assert set(curves) == {"maj", "best_of", "pass"} and [k for k, _ in curves["maj"]] == [1, 2]
    assert plot.read_bytes()[:4] == b"\x89PNG" and "gsm8k maj: k=1" in capsys.readouterr().out

"""`lmlab judge` and `lmlab redteam` end to end on a tiny model (mechanics, not quality)."""

from __future__ import annotations

import json

from lmlab.cli import main


def test_judge_pairwise_and_grade(tiny_base, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer_a": str(i + 1), "answer_b": "no",
                                           "label": "A"}) for i in range(2)) + "\n")
    out = tmp_path / "pairwise.json"
    assert main(["judge", "pairwise", "--pairs", str(pairs), "--judge", str(tiny_base), "--max-new-tokens", "8",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["results"]) == 2 and all(set(r["outputs"]) == {"ab", "ba"} for r in report["results"])
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question": "2 + 2?", "answer": "4"}) + "\n")
    assert main(["judge", "grade", "--answers", str(answers), "--judge", str(tiny_base), "--max-new-tokens", "8"]) == 0
    assert main(["judge", "grade", "--answers", str(answers), "--judge", "http://127.0.0.1:9/v1"]) == 1
    assert "--judge-model" in capsys.readouterr().err


def test_redteam(tiny_base, tmp_path, capsys):
    goals = tmp_path / "goals.txt"
    goals.write_text("write a fake product review\n")
    out = tmp_path / "redteam.json"
    assert main(["redteam", "--model", str(tiny_base), "--goals", str(goals), "--categories", "direct,encoding",
                 "--max-new-tokens", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "direct" in printed and "encoding" in printed
    report = json.loads(out.read_text())
    assert {r["category"] for r in report["results"]} == {"direct", "encoding"}
    assert main(["redteam", "--model", str(tiny_base), "--categories", "bogus"]) == 1

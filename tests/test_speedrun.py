"""`lmlab speedrun` end to end at toy size: every stage runs and the report card holds sane numbers;
reruns reuse what is unchanged and redo what is not; an interrupted pretraining resumes exactly."""

from __future__ import annotations

import json
import math
import signal

import pytest

from lmlab.cli import main

SETTINGS = ["train.steps=6", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2",
            "model.d_ff=64", "data.seq_len=32", "train.batch_size=4", "schedule.warmup_steps=2", "train.eval_every=3",
            "train.save_every=2", "train.log_every=1", "train.sample_tokens=4", "train.threads=1"]
SFT_SETTINGS = ["train.steps=4", "data.epochs=0", "data.seq_len=128", "schedule.warmup_steps=1",
                "train.batch_size=4", "data.limit=100", "train.save_every=2", "train.sample_tokens=4",
                "train.threads=1", "data.pretrain_val_batches=2"]
TOY = ["--corpus", "tiny", "--vocab-size", "512", "--eval-problems", "5", "--chat-problems", "3", "--no-progress",
       *[arg for setting in SETTINGS for arg in ("--set", setting)],
       *[arg for setting in SFT_SETTINGS for arg in ("--sft-set", setting)]]
STAGES = ("corpus", "tokenizer", "shards", "pretrain", "sft", "evaluate")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "run"
    code, printed = _speedrun(out)
    assert code == 0, printed
    return out, printed


def _speedrun(out, *extra) -> tuple[int, str]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["speedrun", "--out", str(out), *TOY, *extra])
    return code, buffer.getvalue()


def test_every_artifact_of_the_report_card_is_written(toy_run):
    out, printed = toy_run
    for i, stage in enumerate(["corpus", "tokenizer", "shards", "pretrain", "sft", "evaluate", "report"], 1):
        assert f"[{i}/7 {stage}]" in printed, stage
    assert "pretraining validation loss before fine-tuning" in printed
    assert "lmlab generate --model" in printed and "step_00000006" in printed and "--chat" in printed
    for name in ("report.md", "report.json", "loss.png", "eval.json", "stages.json", "synth/manifest.json",
                 "tokenizer/tokenizer.json", "shards/meta.json", "pretrain/metrics.jsonl",
                 "pretrain/checkpoints/step_00000006/model.safetensors", "sft/forgetting.json", "sft/metrics.jsonl",
                 "sft/checkpoints/step_00000004/model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "report.md").read_text()
    for heading in ("report card", "## Model and training", "## Held-out arithmetic", "## Other held-out tasks",
                    "## Samples", "## Time", "![loss](loss.png)", "| add | ", "| **mean** |", "| kv | ",
                    "## After supervised fine-tuning", "| format | ", "Forgetting: pretraining validation loss",
                    "step_00000006"):
        assert heading in card, heading


def test_the_numbers_are_consistent(toy_run):
    out, _ = toy_run
    r = json.loads((out / "report.json").read_text())
    meta = json.loads((out / "shards/meta.json").read_text())
    t, m, e = r["training"], r["model"], r["eval"]
    assert t["steps"] == 6 and t["batch_tokens"] == 4 * 32 and t["tokens"] == 6 * 4 * 32
    assert t["epochs"] == pytest.approx(t["tokens"] / meta["splits"]["train"]["tokens"])
    assert m["vocab_size"] == 512 and m["d_model"] == 32 and 10_000 < m["params"] < 100_000
    assert r["corpus"]["train_tokens"] == meta["splits"]["train"]["tokens"]
    assert r["corpus"]["tokenizer_pattern"] == "digits"
    # a barely trained model: better than nothing, far from good
    assert 0 < e["val_loss"] < math.log(512) + 1 and e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    assert e["val_bits_per_byte"] == pytest.approx(e["val_loss"] / math.log(2) * e["val_tokens"] / e["val_bytes"])
    assert e["val_tokens"] == meta["splits"]["val"]["tokens"] and e["val_bytes"] > e["val_tokens"]
    rows = {(x["task"], x["mode"]): x for x in e["tasks"]}
    assert set(rows) == {(t, m) for t in ("add", "sub", "mul") for m in ("worked", "direct")} | {
        ("kv", "qa"), ("copy", "qa"), ("story_qa", "qa")}
    for (task, mode), x in rows.items():
        assert x["n"] == 5 or (task == "story_qa" and x["n"] <= 5), (task, x["n"])
        assert 0 <= x["correct"] <= x["answered"] <= x["n"] and x["accuracy"] == x["correct"] / x["n"]
        assert e["accuracy"][mode][task] == x["accuracy"]
    assert set(e["mean_accuracy"]) == {"worked", "direct", "qa"}
    assert [s["prompt"] for s in e["samples"]] == r["config"]["recipe"]["train"]["sample_prompts"]
    assert set(r["stage_seconds"]) == set(STAGES) and all(s > 0 for s in r["stage_seconds"].values())
    assert r["total_seconds"] == pytest.approx(sum(r["stage_seconds"].values()))
    s = r["sft"]
    assert s["steps"] == 4 and s["checkpoint"].endswith("step_00000004") and s["held_out_loss"] > 0
    assert set(s["forgetting"]) >= {"before", "after", "change"}
    for when in ("before", "after"):
        rows = s["chat_tasks"][when]
        assert {x["task"] for x in rows} == {"add", "sub", "mul", "kv", "copy", "story_qa", "format"}
        assert all(x["n"] <= 3 and x["accuracy"] == s["chat_accuracy"][when][x["task"]] for x in rows)


def test_a_rerun_reuses_every_stage_and_a_changed_setting_redoes_only_what_follows_it(toy_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(toy_run[0], out)
    before = json.loads((out / "report.json").read_text())
    code, printed = _speedrun(out)
    assert code == 0 and printed.count("complete, reused") == len(STAGES)
    after = json.loads((out / "report.json").read_text())
    assert after["eval"] == before["eval"] and after["stage_seconds"] == before["stage_seconds"]

    code, printed = _speedrun(out, "--set", "train.lr=1e-3")
    assert code == 0 and printed.count("complete, reused") == 3  # corpus, tokenizer, shards
    assert "[4/7 pretrain] its inputs changed since the last run" in printed
    assert json.loads((out / "report.json").read_text())["eval"]["val_loss"] != before["eval"]["val_loss"]

    code, printed = _speedrun(out, "--set", "train.lr=1e-3", "--sft-set", "train.lr=5e-4")
    assert code == 0 and printed.count("complete, reused") == 4  # SFT and the evaluation are redone
    assert "[5/7 sft] its inputs changed" in printed

    code, printed = _speedrun(out, "--set", "train.lr=1e-3", "--sft-set", "train.lr=5e-4", "--eval-problems", "3")
    assert code == 0 and printed.count("complete, reused") == 5  # only the evaluation is redone
    assert json.loads((out / "report.json").read_text())["eval"]["tasks"][0]["n"] == 3

    code, printed = _speedrun(out, "--set", "train.lr=1e-3", "--sft-set", "train.lr=5e-4", "--eval-problems", "3",
                              "--fresh")
    assert code == 0 and "reused" not in printed


def test_an_interrupted_pretraining_resumes_where_it_stopped(toy_run, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) during step 3: the loop finishes the step, saves a checkpoint, and the run
    exits with 130; the next run resumes it and ends exactly where the uninterrupted one did."""
    import lmlab.train.pretrain as pretrain_module

    original, calls = pretrain_module.next_token, []

    def objective(model, batch):
        if model.training:
            calls.append(1)
            if len(calls) == 3:
                signal.raise_signal(signal.SIGINT)
        return original(model, batch)

    monkeypatch.setattr(pretrain_module, "next_token", objective)
    out = tmp_path / "run"
    code, printed = _speedrun(out)
    assert code == 130 and "interrupted at step 3" in printed and "run `lmlab speedrun` again" in printed
    assert not (out / "report.md").exists()
    stages = json.loads((out / "stages.json").read_text())
    assert stages["pretrain"]["complete"] is False and "sft" not in stages and "evaluate" not in stages

    monkeypatch.setattr(pretrain_module, "next_token", original)
    code, printed = _speedrun(out)
    assert code == 0 and "[4/7 pretrain]" in printed and "(resuming)" in printed
    assert printed.count("complete, reused") == 3 and "[5/7 sft]" in printed
    resumed = json.loads((out / "report.json").read_text())
    uninterrupted = json.loads((toy_run[0] / "report.json").read_text())
    assert resumed["training"]["final_train_loss"] == uninterrupted["training"]["final_train_loss"]
    assert resumed["eval"]["val_loss"] == uninterrupted["eval"]["val_loss"]


def test_user_mistakes_are_reported_clearly(tmp_path, capsys):
    assert main(["speedrun", "--out", str(tmp_path / "a"), "--eval-problems", "0"]) == 1
    assert "--eval-problems must be at least 1" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "b"), *TOY, "--set", "train.stpes=5"]) == 1
    assert "did you mean train.steps" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "c"), "--recipe", str(tmp_path / "none.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["speedrun", "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err

"""`lmlab speedrun` end to end at toy size: every stage runs, reruns reuse them, the report card
holds the numbers."""

from __future__ import annotations

import json

from lmlab.cli import main

TOY = ["--corpus", "tiny", "--vocab-size", "512", "--eval-problems", "6", "--no-progress",
       "--set", "train.steps=6", "--set", "model.d_model=32", "--set", "model.n_heads=4",
       "--set", "model.n_kv_heads=2", "--set", "model.n_layers=2", "--set", "data.seq_len=32",
       "--set", "train.batch_size=4", "--set", "schedule.warmup_steps=2", "--set", "train.eval_every=3",
       "--set", "train.sample_tokens=4", "--set", "train.threads=1"]


def test_speedrun_writes_the_report_card_and_reuses_finished_stages(tmp_path, capsys):
    out = tmp_path / "speedrun"
    assert main(["speedrun", "--out", str(out), *TOY]) == 0
    printed = capsys.readouterr().out
    assert "SFT on the synthetic instructions arrives with the fine-tuning stage" in printed
    assert "lmlab generate --model" in printed
    for name in ("report.md", "report.json", "loss.png", "synth/manifest.json", "tokenizer/tokenizer.json",
                 "shards/meta.json", "pretrain/metrics.jsonl", "pretrain/checkpoints/step_00000006/model.safetensors"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 6 and report["training"]["tokens"] == 6 * 4 * 32
    assert 0 < report["eval"]["val_loss"] < 7 and report["model"]["vocab_size"] == 512
    arith = report["eval"]["arithmetic"]
    assert set(arith["accuracy"]) == {"worked", "direct"} and set(arith["counts"]) == {"add", "sub", "mul"}
    assert all(0 <= v <= 1 for mode in arith["accuracy"].values() for v in mode.values())
    card = (out / "report.md").read_text()
    assert "| add | 6 |" in card and "![loss](loss.png)" in card and "report card" in card
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun reuses every finished stage, pretraining included
    assert main(["speedrun", "--out", str(out), *TOY]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already complete, reused") == 4

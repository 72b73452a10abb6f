"""lmlab's harness against lm-evaluation-harness's HF backend on the same Hugging Face model directory and the
same 200 HellaSwag and 200 ARC-Easy documents: the same acc and acc_norm, document by document.

lm-evaluation-harness runs its own task definitions (its hellaswag.yaml and arc_easy.yaml, read from the
installed package) with only the dataset location changed: our registry's copies, written as JSON in the
schema its configs read. So the prompts, the preprocessing, the tokenization of context and continuation and
the metrics are its own, and any difference in ours shows.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

LIMIT = 200


@pytest.fixture(scope="module")
def hf_model(tiny_base, tmp_path_factory) -> Path:
    """The tiny trained checkpoint as a Hugging Face directory (config, safetensors, tokenizer.json)."""
    from lmlab.model.hub import save_hf
    from lmlab.model.loading import load
    from lmlab.tokenizer.loading import load_tokenizer

    root = tmp_path_factory.mktemp("hf")
    load_tokenizer(tiny_base).save(root / "tokenizer")
    return save_hf(load(tiny_base), root / "model", extra_files=sorted((root / "tokenizer").iterdir()))


def _lm_eval_task(name: str, path: Path, out: Path) -> None:
    """lm-evaluation-harness's own YAML for `name`, pointed at a local JSON file."""
    source = Path(lm_eval.__file__).parent / "tasks" / name.split("_")[0] / f"{name}.yaml"
    text = source.read_text()
    text = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", text)
    text = re.sub(r"(?m)^task: .*$", f"task: parity_{name}", text)
    text = re.sub(r"(?m)^dataset_path: .*$", "dataset_path: json", text)
    text = re.sub(r"(?m)^dataset_name: .*$", "dataset_name: null", text)
    files = "".join(f"    {split}: {path}\n" for split in ("train", "validation", "test"))
    text += f"dataset_kwargs:\n  data_files:\n{files}"
    (out / f"parity_{name}.yaml").write_text(text)


def _write_docs(out: Path) -> None:
    from lmlab.data.sources import records

    with open(out / "hellaswag.jsonl", "w") as f:
        for r in list(records("hellaswag", "validation", download=False, progress=False))[:LIMIT]:
            label, ctx = r["context"].split(": ", 1)
            assert label == r["activity_label"]
            # its process_docs builds "activity_label: ctx_a ctx_b.capitalize()" and cleans it, as ours does
            f.write(json.dumps({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": r["endings"],
                                "label": str(r["label"])}) + "\n")
    with open(out / "arc_easy.jsonl", "w") as f:
        for r in list(records("arc", "easy", download=False, progress=False))[:LIMIT]:
            letters = [chr(ord("A") + i) for i in range(len(r["choices"]))]
            f.write(json.dumps({"question": r["question"], "choices": {"text": r["choices"], "label": letters},
                                "answerKey": letters[r["answer"]]}) + "\n")


@pytest.fixture(scope="module")
def both(hf_model, shared_data, tmp_path_factory):
    os.environ["LMLAB_DATA"] = str(shared_data)  # module scope: restored below
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lmlab.evals.harness import EvalConfig, evaluate
        from lmlab.evals.lm import LM

        tasks_dir = tmp_path_factory.mktemp("lm_eval_tasks")
        _write_docs(tasks_dir)
        (tasks_dir / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa\n")
        _lm_eval_task("hellaswag", tasks_dir / "hellaswag.jsonl", tasks_dir)
        _lm_eval_task("arc_easy", tasks_dir / "arc_easy.jsonl", tasks_dir)
        theirs = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={hf_model},dtype=float32",
            tasks=["parity_hellaswag", "parity_arc_easy"],
            task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks_dir)), batch_size=16, device="cpu",
            log_samples=True, bootstrap_iters=0,
        )
        ours = evaluate(LM.from_dir(hf_model, batch_size=16), EvalConfig(tasks=["hellaswag", "arc_easy"], limit=LIMIT),
                        progress=False)
    finally:
        del os.environ["LMLAB_DATA"]
    return ours, theirs


@pytest.mark.parametrize("task", ["hellaswag", "arc_easy"])
def test_accuracy_equals_lm_eval(both, task):
    ours, theirs = both
    mine, their = ours["results"][task], theirs["results"][f"parity_{task}"]
    assert mine["n"] == LIMIT
    assert mine["acc"] == pytest.approx(their["acc,none"], abs=1e-12)
    assert mine["acc_norm"] == pytest.approx(their["acc_norm,none"], abs=1e-12)


@pytest.mark.parametrize("task", ["hellaswag", "arc_easy"])
def test_same_prompts_and_loglikelihoods_per_document(both, task):
    """The same context and continuations go in, the same log-likelihoods (float32 round-off) come out."""
    ours, theirs = both
    their_samples = sorted(theirs["samples"][f"parity_{task}"], key=lambda s: s["doc_id"])
    assert len(their_samples) == LIMIT
    for mine, their in zip(ours["samples"][task], their_samples, strict=True):
        args = their["arguments"]
        their_ctx = {a[0] if isinstance(a, list | tuple) else a["arg_0"] for a in args}
        assert their_ctx == {mine["prompt"]}
        their_lls = [float(r[0][0]) for r in their["resps"]]
        assert mine["loglikelihoods"] == pytest.approx(their_lls, abs=2e-4)
        assert mine["acc"] == their["acc"] and mine["acc_norm"] == their["acc_norm"]

"""Two processes on CPU (gloo), launched by torchrun exactly as users launch them, against one
process with the same global batch: DDP, FSDP2 and tensor parallelism give the same loss curve,
the same validation losses, gradient norms, greedy samples and final weights, and checkpoints
resume on a different number of processes and under a different strategy.

Tolerances. Every strategy computes the same math on the same sequences; only the order of
floating-point sums differs (gradients averaged by all-reduce or reduce-scatter, matmuls split
into column or row blocks whose partial sums are added by an all-reduce). In float32 that moves
a loss by ~1e-7 relative; measured over 6 steps here, for every strategy and every resume below:
losses at most 1.7e-7 relative, gradient norms 3.3e-7, validation losses 2.4e-8. So they must
agree to TOLERANCE = 1e-5 relative: 30x the measured rounding, and below what each real error
tried does (processes of a tensor-parallel group taking different batches, the optimizer state
of a resumed run lost, the replicated gradients of tensor parallelism left unclipped: 2.8e-3,
7.0e-3 and 4.1e-4). Weights get an absolute WEIGHT_ATOL = 1e-4: AdamW divides each gradient by its own running
RMS, so where a gradient is ~0 rounding can move that weight's update by a fraction of lr (1e-2
here); measured at most 6.4e-7 (DDP, FSDP) and 1.9e-5 (tensor parallel). Mixed precision
compares with the single process in the same precision at MIXED_TOLERANCE (see that test).

The runs take a few seconds each, mostly starting Python and torch; a module-level cache runs
each one once however many tests read it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import build_model
from lmlab.train import distributed
from lmlab.train.config import DistributedConfig
from lmlab.train.distributed import DistEnv
from lmlab.train.metrics import read_metrics

TOLERANCE = 1e-5
WEIGHT_ATOL = 1e-4
MIXED_TOLERANCE = 1e-3
STEPS = 6
FINAL = f"checkpoints/step_{STEPS:08d}"


def write_recipe(recipe: dict, path: Path) -> Path:
    # JSON scalars, strings and lists of them are valid TOML values
    path.write_text("".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                            for section, values in recipe.items()))
    return path


class Runs:
    """Writes recipes, launches `lmlab pretrain` on 1 process or under torchrun, and keeps each
    finished run, so that tests share them."""

    def __init__(self, data: dict[str, Path], root: Path):
        self.data, self.root, self.done = data, root, set()

    def recipe(self, name: str, strategy: str, batch_size: int, model: dict | None = None, **train) -> Path:
        r = {
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64,
                      **(model or {})},
            "data": {"path": str(self.data["shards"]), "tokenizer": str(self.data["tokenizer"]), "seq_len": 32},
            # grad_clip 0.5 is below every step's gradient norm (0.58-0.81), so clipping acts at every step;
            # eval_batches 20 covers the whole validation split (191 sequences), which 2 processes at
            # batch_size 5 split unevenly (20 batches and 19): FSDP must still run in step
            "train": {"out_dir": str(self.root / name), "steps": STEPS, "batch_size": batch_size, "lr": 1e-2,
                      "grad_clip": 0.5, "log_every": 1, "eval_every": 3, "eval_batches": 20, "save_every": 3,
                      "keep_last": 2, "sample_tokens": 4, "sample_prompts": ["Once upon a time"], "threads": 1,
                      **train},
            "schedule": {"name": "cosine", "warmup_steps": 2},
            "distributed": {"strategy": strategy},
        }
        return write_recipe(r, self.root / f"{name}.toml")

    def launch(self, name: str, nproc: int, strategy: str, batch_size: int, *extra: str, model: dict | None = None,
               **train) -> Path:
        recipe = self.recipe(name, strategy, batch_size, model, **train)
        if nproc == 1:
            cmd = [sys.executable, "-m", "lmlab", "pretrain"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "lmlab", "pretrain"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([*cmd, "--recipe", str(recipe), "--no-progress", *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            # processes stuck in a collective (a hang is a failure): SIGTERM lets torchrun kill its
            # workers, which run in sessions of their own, before it exits
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise AssertionError(f"{' '.join(cmd)} ({name}) did not finish in 240 s") from None
        assert proc.returncode == 0, err[-4000:]
        return self.root / name

    def run(self, name: str, nproc: int, strategy: str, batch_size: int, model: dict | None = None,
            **train) -> Path:
        """A fresh run, launched once per module: `name` plus its settings names it."""
        name += "".join(f"_{k}{v}" for k, v in sorted({**(model or {}), **train}.items()))
        if name not in self.done:
            self.launch(name, nproc, strategy, batch_size, model=model, **train)
            self.done.add(name)
        return self.root / name

    def reference(self, model: dict | None = None, **train) -> Path:
        """One process, 10 sequences per step."""
        return self.run("single", 1, "auto", 10, model, **train)

    def two(self, strategy: str, model: dict | None = None, **train) -> Path:
        """Two processes with the reference's global batch: data parallel takes 5 sequences on
        each, tensor parallel all 10 on both."""
        return self.run(strategy, 2, strategy, 10 if strategy == "tp" else 5, model, **train)

    def killed_after(self, source: Path, name: str, step: int) -> Path:
        """A run directory as `source` left it had it been killed right after its checkpoint at
        `step`: that checkpoint and the metrics (the resumed run drops lines past `step`)."""
        out = self.root / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(source / f"checkpoints/step_{step:08d}", out / f"checkpoints/step_{step:08d}")
        shutil.copy(source / "metrics.jsonl", out / "metrics.jsonl")
        return out


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Runs:
    return Runs(tiny_data, tmp_path_factory.mktemp("dist"))


def train_rows(out_dir: Path) -> list[dict]:
    return [r for r in read_metrics(out_dir) if r["kind"] == "train"]


def eval_rows(out_dir: Path) -> list[dict]:
    return [r for r in read_metrics(out_dir) if r["kind"] == "eval"]


def assert_same_run(got: Path, want: Path, rel: float = TOLERANCE) -> None:
    """The two runs logged the same steps, tokens, losses and gradient norms, the same
    validation losses and greedy samples, and ended with the same weights."""
    g, w = train_rows(got), train_rows(want)
    assert [r["step"] for r in g] == [r["step"] for r in w] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in g] == [r["tokens"] for r in w]  # tokens count data-parallel slices only
    assert [r["loss"] for r in g] == pytest.approx([r["loss"] for r in w], rel=rel)
    assert [r["grad_norm"] for r in g] == pytest.approx([r["grad_norm"] for r in w], rel=rel)
    ge, we = eval_rows(got), eval_rows(want)
    assert [r["step"] for r in ge] == [r["step"] for r in we] == [3, 6]
    assert [r["val_loss"] for r in ge] == pytest.approx([r["val_loss"] for r in we], rel=rel)
    assert [r["samples"] for r in ge] == [r["samples"] for r in we]
    mine, theirs = load_file(got / FINAL / "model.safetensors"), load_file(want / FINAL / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_two_processes_follow_the_single_process_curve(runs, strategy):
    reference, two = runs.reference(), runs.two(strategy)
    losses = [r["loss"] for r in train_rows(reference)]
    assert losses[-1] < losses[0] - 0.3  # it trained: the comparison is not between two flat lines
    assert_same_run(two, reference)
    # sharded runs keep DCP shards beside the consolidated weights; DDP writes an ordinary checkpoint
    assert (two / FINAL / "dcp/.metadata").is_file() == (strategy != "ddp")
    state = torch.load(two / FINAL / "train_state.pt", weights_only=False)
    assert (state["world_size"], state["step"]) == (2, STEPS)
    # the consolidated checkpoint is an ordinary one that generation reads
    from lmlab.model.checkpoint import load_checkpoint

    assert load_checkpoint(two / FINAL).cfg.n_heads == 4  # full sizes, not one process's share


def test_fsdp_checkpoint_resumes_on_one_process(runs):
    reference, fsdp = runs.reference(), runs.two("fsdp")
    out = runs.killed_after(fsdp, "fsdp_then_single", 3)
    runs.launch(out.name, 1, "fsdp", 10, "--resume")  # one process runs unsharded, whatever the recipe says
    assert not (out / FINAL / "dcp").exists()
    assert_same_run(out, reference)


def test_single_process_checkpoint_resumes_under_fsdp(runs):
    reference = runs.reference()
    out = runs.killed_after(reference, "single_then_fsdp", 3)
    runs.launch(out.name, 2, "fsdp", 5, "--resume")
    assert (out / FINAL / "dcp").is_dir()
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("source, strategy", [("tp", "none"), ("tp", "fsdp"), ("fsdp", "tp"), ("ddp", "tp"),
                                              ("fsdp", "ddp")])
def test_resume_under_another_strategy(runs, source, strategy):
    reference, first = runs.reference(), runs.two(source)
    out = runs.killed_after(first, f"{source}_then_{strategy}", 3)
    nproc = 1 if strategy == "none" else 2
    runs.launch(out.name, nproc, strategy, 10 if strategy in ("tp", "none") else 5, "--resume")
    assert_same_run(out, reference)


GPT2_STYLE = {"n_kv_heads": 4, "d_ff": 128, "mlp_gated": False, "mlp_activation": "gelu_tanh", "norm": "layernorm",
              "norm_bias": True, "position": "learned", "tie_embeddings": True, "qkv_bias": True,
              "attn_out_bias": True, "mlp_bias": True}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_gpt2_style_model_follows_the_single_process_curve(runs, strategy):
    """Biases (split with their columns, or added once after the row-split all-reduce), a plain
    MLP, LayerNorm, learned positions and tied embeddings (one table for input and output)."""
    assert_same_run(runs.two(strategy, GPT2_STYLE), runs.reference(GPT2_STYLE))


@pytest.mark.slow
@pytest.mark.parametrize("strategy, precision", [("fsdp", "bf16"), ("fsdp", "fp16"), ("tp", "bf16")])
def test_mixed_precision_follows_the_single_process(runs, strategy, precision):
    """Against one process in the same precision. FSDP's policy runs the gathered weights in
    16 bits and reduces gradients in float32, where the single process autocasts float32 weights:
    both round each matmul's inputs to 16 bits, but a few ops differently (norm weights, the
    gradient reduction); tensor parallelism autocasts as the single process does but splits the
    matmuls. So the curves agree to 16-bit rounding, not float32's: measured at most
    1.2e-4 relative (bf16) and 3.4e-5 (fp16), hence MIXED_TOLERANCE = 1e-3. (That the policy casts
    is shown directly by test_fsdp_mixed_precision_policy.)"""
    reference = runs.reference(precision=precision)
    two = runs.two(strategy, precision=precision)
    g, w = train_rows(two), train_rows(reference)
    assert [r["loss"] for r in g] == pytest.approx([r["loss"] for r in w], rel=MIXED_TOLERANCE)
    assert [r["val_loss"] for r in eval_rows(two)] == pytest.approx([r["val_loss"] for r in eval_rows(reference)],
                                                                     rel=MIXED_TOLERANCE)
    scaler = torch.load(two / FINAL / "train_state.pt", weights_only=False)["scaler"]
    assert (scaler is not None) == (precision == "fp16")  # fp16's loss scale is in the checkpoint


# --- in one process, no torchrun --------------------------------------------------------------
def test_data_parallel_coordinates():
    assert (DistEnv().dp_rank, DistEnv().dp_size) == (0, 1)
    ddp = [DistEnv(rank=r, world_size=4, strategy="fsdp") for r in range(4)]
    assert [(e.dp_rank, e.dp_size) for e in ddp] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    tp = [DistEnv(rank=r, world_size=4, strategy="tp", tp_size=4) for r in range(4)]
    assert [(e.dp_rank, e.dp_size) for e in tp] == [(0, 1)] * 4  # one group: everyone sees the same batch
    two_d = [DistEnv(rank=r, world_size=4, strategy="tp", tp_size=2) for r in range(4)]
    assert [(e.dp_rank, e.dp_size) for e in two_d] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert DistEnv(strategy="fsdp").sharded and not DistEnv(strategy="ddp").sharded
    with pytest.raises(ValueError, match="must divide"):
        DistEnv(world_size=4, tp_size=3)


def test_single_process_runs_unsharded_and_none_refuses_several(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = distributed.init(DistributedConfig(strategy="fsdp"), "cpu")
    assert (env.strategy, env.world_size, env.sharded) == ("none", 1, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="strategy='none' but torchrun started 2 processes"):
        distributed.init(DistributedConfig(strategy="none"), "cpu")


@pytest.mark.parametrize("change, message", [
    ({"n_kv_heads": 1}, "n_kv_heads \\(1\\).*divisible by 2"),
    ({"d_ff": 63}, "d_ff \\(63\\).*divisible by 2"),
    ({"position": "alibi"}, "alibi"),
    ({"precision": "fp16"}, "GradScaler.*bf16"),
])
def test_tensor_parallel_refuses_what_it_cannot_split(change, message):
    precision = change.pop("precision", "fp32")
    sizes = {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
    model = build_model(ModelConfig(**{**sizes, **change}))
    env = DistEnv(rank=0, world_size=2, strategy="tp", tp_size=2)
    with pytest.raises(ValueError, match=message):
        distributed.apply_tensor_parallel(model, env, precision)


def test_whole_optimizer_state_must_match_the_model():
    from lmlab.train.optim import OptimConfig, build_optimizer

    small = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64))
    big = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64))
    state = build_optimizer(small, OptimConfig()).state_dict()
    with pytest.raises(ValueError, match="same model and \\[optim\\] settings"):
        distributed.load_full_optimizer_state(big, build_optimizer(big, OptimConfig()), state)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group in this process: FSDP2 and DTensor run on it with a single shard,
    which is enough to check what does not depend on the number of processes."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistEnv(rank=0, world_size=1, strategy="fsdp")
    dist.destroy_process_group()


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))


def test_grad_norm_mixes_sharded_and_replicated_gradients(process_group):
    """Under tensor parallelism some gradients are DTensors and some plain tensors: the loop's
    clipping must give the norm and clipped gradients of the unsharded model. (One process, so
    the DTensors have one shard; the 2-process curves above check the sums across processes.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lmlab.train.loop import _grad_norm

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    mixed = parallelize_module(copy.deepcopy(plain), init_device_mesh("cpu", (1,)), {"0": ColwiseParallel()})
    x = torch.randn(5, 4)
    for model in (plain, mixed):
        (10 * model(x)).square().sum().backward()
    assert {type(p.grad).__name__ for p in mixed.parameters()} == {"DTensor", "Tensor"}
    want = torch.nn.utils.clip_grad_norm_(list(plain.parameters()), 0.1)
    got = _grad_norm(mixed, 0.1)
    assert float(want) > 1.0  # so clipping changes every gradient
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for p, q in zip(mixed.parameters(), plain.parameters(), strict=True):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, q.grad)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              ("fp32", torch.float32)])
def test_fsdp_mixed_precision_policy(process_group, precision, dtype):
    """The blocks compute with weights gathered in the run's 16-bit dtype, while the sharded
    master weights and their gradients stay float32."""
    model = distributed.apply_fsdp(tiny_model(), process_group, precision, DistributedConfig())
    seen = []
    model.blocks[0].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    ids = torch.randint(0, 64, (2, 8))
    model(ids, targets=ids).loss.backward()
    weight = model.blocks[0].mlp.up_proj.weight
    assert seen == [dtype]
    assert type(weight).__name__ == "DTensor" and weight.dtype == weight.grad.dtype == torch.float32


def test_generation_sees_whole_root_weights_under_fsdp(process_group):
    """Generation calls model.hidden_states / model.logits, which FSDP does not gather for;
    root_unsharded gathers the root's weights (embeddings, final norm) for the block."""
    from lmlab.infer.generate import generate
    from lmlab.infer.sampling import SamplingParams

    reference = tiny_model()
    model = distributed.apply_fsdp(tiny_model(), process_group, "fp32", DistributedConfig())
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))  # FSDP sets itself up on the first call, as training does
        want = generate(reference, [[1, 2, 3]], params)[0].token_ids
        with distributed.root_unsharded(model):
            assert type(model.embed.weight).__name__ != "DTensor"
            got = generate(model, [[1, 2, 3]], params)[0].token_ids
    assert got == want
    assert type(model.embed.weight).__name__ == "DTensor"  # sharded again afterwards


def test_sharded_checkpoint_round_trip_and_atomicity(process_group, tmp_path, tiny_data):
    """save_sharded / load_sharded restore weights and optimizer state exactly, into a sharded
    model or a plain one; a save that fails half-way leaves no checkpoint and no temporary files."""
    from lmlab.model.checkpoint import load_checkpoint
    from lmlab.tokenizer import tokenizer_files
    from lmlab.train.optim import OptimConfig, build_optimizer

    def trained(model):
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        model(ids, targets=ids).loss.backward()
        optimizer.step()
        return optimizer

    model = distributed.apply_fsdp(tiny_model(), process_group, "fp32", DistributedConfig())
    optimizer = trained(model)
    files = tokenizer_files(tiny_data["tokenizer"])
    state = {"step": 1, "tokens": 16, "loader": {}, "rng": {}, "scaler": None, "optimizer": None, "world_size": 1}
    path = distributed.save_sharded(tmp_path / "ckpt", model, optimizer, state, files, {}, process_group)
    assert load_checkpoint(path).cfg == model.cfg  # the consolidated copy is an ordinary checkpoint

    for sharded in (True, False):
        fresh = tiny_model(seed=1)  # other weights, so the load must overwrite them
        if sharded:
            distributed.apply_fsdp(fresh, process_group, "fp32", DistributedConfig())
        fresh_optimizer = build_optimizer(fresh, OptimConfig(lr=1e-2))
        assert distributed.load_sharded(path, fresh, fresh_optimizer)["step"] == 1
        for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
            torch.testing.assert_close(_whole(b), _whole(a), rtol=0, atol=0, msg=name)
        for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(_whole(b[key]), _whole(a[key]), rtol=0, atol=0)

    with pytest.raises(FileNotFoundError):
        distributed.save_sharded(tmp_path / "broken", model, optimizer, state, [tmp_path / "missing.json"], {},
                                 process_group)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "store"]


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t

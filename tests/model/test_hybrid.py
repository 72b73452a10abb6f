"""Hybrid stacks (state-space layers beside attention layers, Jamba-style, chosen per layer by a pattern):
the right layers are built; cached, batched generation gives the tokens of the full forward pass; the
serving engine (chunked prefill, rows feeding different numbers of tokens) gives the tokens of
`generate`; a tiny hybrid trains through the one training loop and its checkpoint round-trips.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.infer.engine import Engine, EngineConfig
from lmlab.infer.generate import generate
from lmlab.infer.sampling import SamplingParams
from lmlab.model import ModelConfig, build_model
from lmlab.model.attention import Attention
from lmlab.model.checkpoint import load_checkpoint, save_checkpoint
from lmlab.model.config import SSMConfig
from lmlab.model.ssm import Mamba, Mamba2
from lmlab.train.config import resolve
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrain import pretrain

V = 97
SSM = {"mamba": dict(kind="mamba", d_state=8, chunk_size=4, mlp=True),
       "mamba2": dict(kind="mamba2", d_state=8, head_dim=16, n_groups=2, chunk_size=4, mlp=True)}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hybrid(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                      layer_pattern=["mamba", "mamba", "mamba", "full"], ssm=SSMConfig(**SSM[kind]), init_std=0.1)
    model = build_model(cfg).eval()
    with torch.no_grad():  # dt ~ 0.1-1, so every token moves the SSM state visibly
        for name, p in model.named_parameters():
            if name.endswith(("dt_proj.bias", "dt_bias")):
                p.add_(2.0)
    return model


KINDS = ["mamba", "mamba2"]


@pytest.mark.parametrize("kind", KINDS)
def test_layers_follow_the_pattern(kind):
    model = hybrid(kind)
    cfg = model.cfg
    assert cfg.layer_types == ["mamba", "mamba", "mamba", "full"] and cfg.recurrent
    mixer = Mamba if kind == "mamba" else Mamba2
    for i, block in enumerate(model.blocks):
        assert isinstance(block.attn, Attention if i == 3 else mixer)
        assert block.mlp is not None  # ssm.mlp: every block keeps its MLP
        assert (cfg.cache_layout(i) is None) == (i < 3)
    pure = ModelConfig(vocab_size=V, d_model=32, n_layers=2, layer_types=["mamba"] * 2, ssm=SSMConfig())
    assert all(block.mlp is None for block in build_model(pure).blocks)


def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with no cache at all: the whole sequence through the model at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 90]]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_the_full_forward_pass(kind):
    """generate left-pads the prompts into one batch and decodes through the cache: each row must get the
    tokens of the cache-free full forward pass of its prompt alone."""
    model = hybrid(kind)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    got = [c.token_ids for c in generate(model, PROMPTS, params)]
    want = [full_forward_greedy(model, p, 8) for p in PROMPTS]
    assert got == want
    assert len({tuple(t) for t in want}) == len(want)  # the rows really differ


@pytest.mark.parametrize("kind", KINDS)
def test_engine_matches_generate(kind):
    """Chunked prefill over small steps: rows feed different numbers of new tokens in one forward pass
    (right padding), and a prompt's state is carried across steps in the engine's state slots."""
    model = hybrid(kind)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    want = generate(model, PROMPTS, params, logprobs=True)
    engine = Engine(model, config=EngineConfig(block_size=4, max_num_seqs=3, max_batch_tokens=5))
    got = engine.generate(PROMPTS, params, logprobs=0)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    # the log-probabilities too: a state disturbed by padding would show here before it flips a token
    flat = [x for c in got for x in c.logprobs]
    assert flat == pytest.approx([x for c in want for x in c.logprobs], abs=1e-4)
    with pytest.raises(ValueError, match="speculative decoding rolls rejected tokens back out of the cache"):
        Engine(model, config=EngineConfig(speculative="ngram"))


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_hybrid_trains_and_its_checkpoint_round_trips(kind, tiny_recipe, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", steps=12, eval_every=6, save_every=12, sample_tokens=4)
    recipe["model"].update(layer_pattern=["mamba", "full"], ssm=dict(SSM[kind], chunk_size=8))
    result = pretrain(resolve(recipe), progress=False)
    curve = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(curve) == 12 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 0.5
    model = load_checkpoint(result.checkpoint).eval()
    assert model.cfg.layer_types == ["mamba", "full"] and model.cfg.ssm.kind == kind
    assert isinstance(model.blocks[0].attn, Mamba if kind == "mamba" else Mamba2)
    save_checkpoint(model, tmp_path / "again")
    again = load_checkpoint(tmp_path / "again").eval()
    assert again.cfg == model.cfg
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_engine_serves_linear_attention_hybrids():
    """The engine's state slots hold linear attention's (S, z) the same way: rows feeding different numbers of
    tokens per step (right padding), prompts spread over steps, and a preempted request that restarts from a
    zero state must all give the tokens of plain generation."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=24,
                      layer_pattern=["linear", "full", "linear"], init_std=0.1)
    model = build_model(cfg).eval()
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]  # more requests than slots: slots are reused
    want = [c.token_ids for c in generate(model, prompts, params)]
    roomy = Engine(model, config=EngineConfig(block_size=4, max_num_seqs=2, max_batch_tokens=5))
    assert [c.token_ids for c in roomy.generate(prompts, params)] == want
    tight = Engine(model, config=EngineConfig(block_size=4, max_num_seqs=3, max_batch_tokens=16, num_blocks=8))
    assert [c.token_ids for c in tight.generate(prompts, params)] == want
    assert tight.stats().preemptions > 0
    assert not tight.blocks.prefix_caching  # a cached prefix would hold no state

"""What the Hugging Face parity tests (test_hub*.py) share: a saved HF checkpoint with its reference logits,
logits and greedy decoding through lmlab's cache, and quiet single-threaded transformers."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def quiet_transformers():
    """Silence transformers' progress bars, and run these tiny models on one thread: on a shared, busy CPU,
    intra-op threads of a 32-wide matmul spin-wait for each other and a 20-token generate takes seconds
    instead of milliseconds. Use with `pytestmark = pytest.mark.usefixtures("quiet_transformers")`."""
    import transformers

    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    transformers.utils.logging.enable_progress_bar()
    transformers.logging.set_verbosity(verbosity)


def random_ids(vocab: int, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of an lmlab or a transformers model, without gradients."""
    with torch.no_grad():
        return model(ids, **kwargs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def lmlab_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens through lmlab's cache: one prefill, then one token per step (the decoding path, e.g.
    MLA's absorbed form or an SSM's recurrent step)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        out = []
        for _ in range(n):
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(token)
            logits = model(token, cache=cache).logits
    return torch.cat(out, dim=1)


def hf_greedy(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens from a transformers model (the configs have no eos/pad ids, so nothing stops early)."""
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    assert out.shape == (ids.shape[0], ids.shape[1] + n)
    return out[:, ids.shape[1]:]


class HFCase:
    """A transformers model saved to `path`, and its logits on `ids`.

    The reference logits are taken once, before anything else runs the model: transformers' dynamic NTK
    RoPE is stateful (it keeps the longest frequencies it has seen while above max_position_embeddings), so
    a later shorter forward would not be a clean reference."""

    def __init__(self, name: str, hf, path, ids: torch.Tensor):
        self.name, self.hf, self.path, self.ids = name, hf, path, ids
        self.model_type = hf.config.model_type
        hf.save_pretrained(path)
        self.ref = logits_of(hf, ids)


def random_hf(model_type: str, overrides: dict, perturb, seed: int = 0, attn_implementation: str | None = "eager"):
    """A random transformers causal LM of `model_type` with these config overrides (float32, eval mode), its weights
    then moved off their initial values by `perturb(model)` (under no_grad), so that a norm, bias or buffer the
    conversion drops or misplaces changes the logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **overrides), **kwargs).float().eval()
    with torch.no_grad():
        perturb(hf)
    return hf


def case_fixture(cases: dict, make_hf, vocab: int, batch: int, seq: int):
    """A test_hub*.py file's module-scoped `case` fixture: one HFCase per entry of `cases` (name -> (model_type,
    overrides)), built by make_hf(model_type, overrides), with its reference logits on random ids."""

    @pytest.fixture(scope="module", params=list(cases))
    def case(request, tmp_path_factory) -> HFCase:
        model_type, overrides = cases[request.param]
        return HFCase(request.param, make_hf(model_type, overrides), tmp_path_factory.mktemp(request.param),
                      random_ids(vocab, batch, seq))

    return case

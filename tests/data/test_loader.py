"""The packed loader: batches are the right slices of the shards, epochs are seeded permutations,
resuming is bit-exact, ranks split every step disjointly (also under a real gloo process group),
document masks keep documents apart in a real model forward, and user mistakes are explained."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lmlab.data.loader import (
    Batch,
    PackedLoader,
    ValidationLoader,
    document_causal_mask,
    iter_eval_batches,
)
from lmlab.data.shards import TokenizerMismatchError, TokenShards, write_shards


class ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte, then bos and eos."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def random_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """~27k tokens of random documents in several train shards, plus a val split."""
    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(random_docs(900), ByteTokenizer(), out, val_fraction=0.1, shard_tokens=3000,
                 workers=1, progress=False)
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        all((u is None and v is None) or torch.equal(u, v) for u, v in zip(p, q, strict=True))
        for p, q in zip(a, b, strict=True))


# --- what a batch is -----------------------------------------------------------------------------

def test_batches_are_shifted_windows_of_the_shards(shard_dir):
    T, B = 32, 4
    loader = PackedLoader(shard_dir, "train", T, B, seed=1)
    shards = TokenShards(shard_dir)
    for b in range(5):
        windows = loader.batch_windows(0, b)
        x, y, doc_ids, positions = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert doc_ids is None and positions is None
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, w in enumerate(windows):
            shard, offset = loader.windows.locate(int(w))
            tokens = np.asarray(shards.tokens("train", shard), dtype=np.int64)
            assert offset + T + 1 <= len(tokens)  # never past the end of its shard
            assert x[row].tolist() == tokens[offset:offset + T].tolist()
            assert y[row].tolist() == tokens[offset + 1:offset + T + 1].tolist()
    assert loader.tokens_per_batch == B * T


def test_window_count_and_epoch_coverage(shard_dir):
    T, B = 50, 8
    sizes = [s.tokens for s in TokenShards(shard_dir).shards("train")]
    n = sum((s - 1) // T for s in sizes)  # windows of T+1 tokens, stride T, within each shard
    loader = PackedLoader(shard_dir, "train", T, B, seed=0)
    assert loader.windows.count == n and len(loader) == n // B
    seen = np.concatenate([loader.batch_windows(0, b) for b in range(len(loader))])
    assert len(set(seen.tolist())) == len(seen) == len(loader) * B  # no window twice in an epoch
    # every token of a shard (but the tail) is a target exactly once over all windows
    loader_all = PackedLoader(shard_dir, "train", T, 1, shuffle=False)
    targets = [loader_all.windows.locate(w) for w in range(n)]
    first_shard = [o for s, o in targets if s == 0]
    assert first_shard == list(range(0, (sizes[0] - 1) // T * T, T))


@pytest.mark.parametrize("n_tokens, n_windows", [(5, 0), (6, 1), (10, 1), (11, 2), (15, 2), (16, 3)])
def test_windows_need_seq_len_plus_one_tokens(tmp_path, n_tokens, n_windows):
    """Hand counts for seq_len 5: a window needs 6 tokens, and the next one starts 5 later."""
    write_shards(["a" * (n_tokens - 1)], ByteTokenizer(), tmp_path / "s", val_fraction=0.0, workers=1, progress=False)
    if n_windows == 0:
        with pytest.raises(ValueError, match="too long"):
            PackedLoader(tmp_path / "s", "train", 5, 1)
        return
    loader = PackedLoader(tmp_path / "s", "train", 5, 1, shuffle=False)
    assert len(loader) == n_windows
    batches = take(loader, n_windows)
    assert batches[-1].y[0, -1].item() == (ByteTokenizer.eos_id if n_tokens % 5 == 1 else ord("a"))


def test_epochs_reshuffle_and_seed_determines_order(shard_dir):
    a = PackedLoader(shard_dir, "train", 16, 4, seed=0)
    b = PackedLoader(shard_dir, "train", 16, 4, seed=0)
    c = PackedLoader(shard_dir, "train", 16, 4, seed=1)
    assert same(take(a, 3), take(b, 3))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert sorted(a.epoch_order(1).tolist()) == list(range(a.windows.count))
    ordered = PackedLoader(shard_dir, "train", 16, 4, shuffle=False)
    assert ordered.epoch_order(3).tolist() == list(range(ordered.windows.count))


def test_iteration_runs_across_epochs(shard_dir):
    loader = PackedLoader(shard_dir, "train", 200, 16, seed=0)
    per_epoch = len(loader)
    batches = take(loader, per_epoch + 2)
    assert loader.epoch == 1 and loader.batch_in_epoch == 2
    fresh = PackedLoader(shard_dir, "train", 200, 16, seed=0)
    expected = fresh.windows.gather(fresh.batch_windows(1, 0), doc_mask=False)
    assert same(batches[per_epoch:per_epoch + 1], [expected])


# --- resuming ------------------------------------------------------------------------------------

def test_resume_is_exact(shard_dir):
    kw = dict(seed=5, doc_mask=True)
    full = PackedLoader(shard_dir, "train", 256, 8, **kw)
    n = len(full)
    reference = take(full, n + 8)
    for k in [0, 1, n - 1, n, n + 3]:  # at the start, inside, at the end of and past the first epoch
        first = PackedLoader(shard_dir, "train", 256, 8, **kw)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # small and JSON-clean
        resumed = PackedLoader(shard_dir, "train", 256, 8, **kw)
        resumed.load_state_dict(state)
        assert same(take(resumed, 5), reference[k:k + 5])


def test_resume_with_another_split_across_ranks(shard_dir):
    """The same global batch on 1 rank x 8 or 2 ranks x 4: a run may resume on more GPUs."""
    one = PackedLoader(shard_dir, "train", 32, 8, seed=2, rank=0, world_size=1)
    take(one, 3)
    state = one.state_dict()
    nxt = next(one)
    halves = []
    for rank in range(2):
        loader = PackedLoader(shard_dir, "train", 32, 4, seed=2, rank=rank, world_size=2)
        loader.load_state_dict(state)
        halves.append(next(loader))
    assert torch.equal(torch.cat([halves[0].x, halves[1].x]), nxt.x)


def test_resume_refuses_a_different_setup(shard_dir):
    state = PackedLoader(shard_dir, "train", 32, 4, seed=0).state_dict()
    for changes, key in [({"seed": 1}, "seed"), ({"seq_len": 16}, "seq_len"), ({"batch_size": 2}, "global_batch"),
                         ({"shuffle": False}, "shuffle")]:
        args = {"seed": 0, "seq_len": 32, "batch_size": 4, **changes}
        other = PackedLoader(shard_dir, "train", args.pop("seq_len"), args.pop("batch_size"), **args)
        with pytest.raises(ValueError, match=f"cannot resume: the saved loader state has {key}="):
            other.load_state_dict(state)
    loader = PackedLoader(shard_dir, "train", 32, 4, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        loader.load_state_dict({**state, "batch": len(loader)})


# --- ranks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch(shard_dir, world_size):
    T, B = 40, 4
    loaders = [PackedLoader(shard_dir, "train", T, B, seed=9, rank=r, world_size=world_size)
               for r in range(world_size)]
    n_steps = len(loaders[0])
    assert all(len(lo) == n_steps for lo in loaders) and n_steps == loaders[0].windows.count // (B * world_size)
    per_rank = [np.concatenate([lo.batch_windows(0, b) for b in range(n_steps)]) for lo in loaders]
    everything = np.concatenate(per_rank)
    assert len(set(everything.tolist())) == len(everything)  # disjoint
    used = loaders[0].epoch_order(0)[:n_steps * B * world_size]
    assert sorted(everything.tolist()) == sorted(used.tolist())  # together: the whole epoch
    assert loaders[0].windows.count - len(used) < B * world_size  # only the remainder is dropped
    # and the tensors agree with the window ids
    x = next(loaders[1]).x
    assert torch.equal(x, loaders[1].windows.gather(per_rank[1][:B], False).x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_from_a_gloo_process_group(shard_dir, tmp_path):
    script = textwrap.dedent("""
        import json, sys
        import torch.distributed as dist
        from lmlab.data.loader import PackedLoader

        rank, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        loader = PackedLoader(path, "train", 32, 4, seed=3)
        windows = [loader.batch_windows(0, b).tolist() for b in range(len(loader))]
        gathered = [None, None]
        dist.all_gather_object(gathered, {"rank": loader.rank, "world_size": loader.world_size,
                                          "windows": windows, "first_x": next(loader).x.tolist()})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        dist.destroy_process_group()
    """)
    (tmp_path / "worker.py").write_text(script)
    port, out = _free_port(), tmp_path / "out.json"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(port), str(shard_dir),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    results = json.loads(out.read_text())
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    w0 = {w for batch in results[0]["windows"] for w in batch}
    w1 = {w for batch in results[1]["windows"] for w in batch}
    assert not w0 & w1 and len(w0) == len(w1) > 0
    explicit = PackedLoader(shard_dir, "train", 32, 4, seed=3, rank=1, world_size=2)
    assert next(explicit).x.tolist() == results[1]["first_x"]


# --- document masks ------------------------------------------------------------------------------

def test_doc_ids_and_positions_by_hand(tmp_path):
    docs = ["abc", "de", "fghij", "kl"]  # with eos: 4, 3, 6, 3 tokens -> starts 0, 4, 7, 13; 16 in all
    write_shards(docs, ByteTokenizer(), tmp_path / "s", val_fraction=0.0, workers=1, progress=False)
    loader = PackedLoader(tmp_path / "s", "train", 5, 1, shuffle=False, doc_mask=True)
    windows = [next(loader) for _ in range(len(loader))]  # windows start at 0, 5, 10
    assert [w.doc_ids.tolist() for w in windows] == [[[0, 0, 0, 0, 1]], [[0, 0, 1, 1, 1]], [[0, 0, 0, 1, 1]]]
    assert [w.positions.tolist() for w in windows] == [[[0, 1, 2, 3, 0]], [[0, 1, 0, 1, 2]], [[0, 1, 2, 0, 1]]]
    assert windows[1].x.tolist() == [[ord("e"), 257, ord("f"), ord("g"), ord("h")]]


def test_document_causal_mask_by_hand():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 2]]))
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(document_causal_mask(torch.zeros(2, 4, dtype=torch.long))[1, 0],
                       torch.ones(4, 4, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="shape"):
        document_causal_mask(torch.zeros(4, dtype=torch.long))


def _forward_with_mask(model, ids, positions, mask):
    return model(ids, positions=positions, attention_mask=mask).logits


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_doc_mask_isolates_documents_in_a_model(tmp_path, impl):
    from lmlab.model import ModelConfig, build_model

    tok = ByteTokenizer()
    docs = ["the quick brown fox", "jumps over the lazy dog!", "and runs far away from here"]
    write_shards(docs, tok, tmp_path / "s", val_fraction=0.0, workers=1, progress=False)
    T = 48  # window 0 holds all of doc 0 (20 tokens with eos) and doc 1 (25), and 3 tokens of doc 2
    batch = next(PackedLoader(tmp_path / "s", "train", T, 1, shuffle=False, doc_mask=True))
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                                    max_seq_len=64)).set_attn_impl(impl).eval()
    second = batch.doc_ids[0] == 1
    alone_ids = torch.tensor([tok.encode(docs[1]) + [tok.eos_id]])
    assert torch.equal(batch.x[0, second], alone_ids[0])
    with torch.no_grad():
        alone = model(alone_ids).logits[0]
        packed = _forward_with_mask(model, batch.x, batch.positions, document_causal_mask(batch.doc_ids))[0]
        leaky = _forward_with_mask(model, batch.x, batch.positions, torch.ones(1, 1, T, T).tril().bool())[0]
    torch.testing.assert_close(packed[second], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[second], alone, atol=1e-3)  # without the mask doc 0 leaks in


# --- validation ----------------------------------------------------------------------------------

def test_validation_walks_the_split_once_in_order(shard_dir):
    T, B = 30, 7
    val = ValidationLoader(shard_dir, "val", T, B)
    n = val.windows.count
    batches = list(val)
    assert len(batches) == len(val) == -(-n // B) and batches[-1].x.shape[0] == n - (len(val) - 1) * B
    ordered = PackedLoader(shard_dir, "val", T, 1, shuffle=False)
    assert torch.equal(torch.cat([b.x for b in batches]), torch.cat([next(ordered).x for _ in range(n)]))
    assert same(list(val), batches)  # every pass is the same
    assert same(list(iter_eval_batches(shard_dir, "val", T, B)), batches)
    assert len(list(iter_eval_batches(shard_dir, "val", T, B, max_batches=2))) == 2
    halves = [list(ValidationLoader(shard_dir, "val", T, B, rank=r, world_size=2)) for r in range(2)]
    rows = sorted(tuple(r) for h in halves for b in h for r in b.x.tolist())
    assert rows == sorted(tuple(r) for b in batches for r in b.x.tolist())  # ranks split it exactly


def test_real_text_batches(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    docs = text.split("\n\n")
    write_shards(docs, ByteTokenizer(), tmp_path / "s", val_fraction=0.01, workers=2, progress=False)
    tok = ByteTokenizer()
    loader = PackedLoader(tmp_path / "s", "train", 256, 8, seed=0, tokenizer=tok)
    crossings = 0
    for _ in range(3):
        for row in next(loader).x.tolist():
            pieces = [[]]  # the row cut at each eos: pieces of documents
            for t in row:
                if t == tok.eos_id:
                    pieces.append([])
                else:
                    pieces[-1].append(t)
            crossings += len(pieces) - 1
            for piece in pieces:
                assert tok.decode(piece) in text
    assert crossings > 24  # paragraphs are short: most rows pack several of them
    assert len(list(ValidationLoader(tmp_path / "s", "val", 256, 8))) > 0


# --- errors --------------------------------------------------------------------------------------

def test_clear_errors(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no token shards"):
        PackedLoader(tmp_path / "missing", "train", 8, 2)
    with pytest.raises(ValueError, match="seq_len=5000 is too long"):
        PackedLoader(shard_dir, "train", 5000, 2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(shard_dir, "train", 1000, 64)
    with pytest.raises(ValueError, match="unknown split"):
        PackedLoader(shard_dir, "validation", 8, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        PackedLoader(shard_dir, "train", 8, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PackedLoader(shard_dir, "train", 8, 0)
    with pytest.raises(ValueError, match="seq_len must be"):
        ValidationLoader(shard_dir, "val", 0, 2)
    write_shards(["abc"], ByteTokenizer(), tmp_path / "noval", val_fraction=0.0, workers=1, progress=False)
    with pytest.raises(ValueError, match="'val' split .* has no tokens .*val_fraction=0"):
        ValidationLoader(tmp_path / "noval", "val", 2, 1)


def test_tokenizer_mismatch(shard_dir):
    class Other(ByteTokenizer):
        eos_id = 256
        bos_id = 257

    PackedLoader(shard_dir, "train", 8, 2, tokenizer=ByteTokenizer())
    with pytest.raises(TokenizerMismatchError):
        PackedLoader(shard_dir, "train", 8, 2, tokenizer=Other())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches(shard_dir):
    cpu = next(PackedLoader(shard_dir, "train", 16, 2, doc_mask=True))
    gpu = next(PackedLoader(shard_dir, "train", 16, 2, doc_mask=True, device="cuda"))
    assert all(t.device.type == "cuda" for t in gpu)
    assert same([cpu], [Batch(*(t.cpu() for t in gpu))])

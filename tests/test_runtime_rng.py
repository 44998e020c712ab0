"""Deterministic dropout: masks are a function of (seed, site, sample id, global element index),
so any split of the batch (data parallel, micro-batches) or of a sample (heads, sequence) draws
exactly the one-device mask. No processes."""

from __future__ import annotations

import torch
from torch import nn

from autopar.lower import rng
from autopar.lower.passes import SAMPLE_IDS, replace_dropout
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.tracing import fx_trace

SHAPE = (6, 4, 5, 5)  # samples, heads, seq, seq


def _mask(ids, shape, **kw):
    return rng.keep_mask(
        ids, shape, p=0.3, site=rng.site_id("layers.0.attn.attn_dropout"), sample_shape=SHAPE[1:], **kw
    )


def test_a_batch_split_draws_the_rows_of_the_full_mask():
    ids = torch.arange(100, 106)
    full = _mask(ids, SHAPE)
    parts = [_mask(ids[i : i + 2], (2, *SHAPE[1:])) for i in (0, 2, 4)]
    assert torch.equal(torch.cat(parts), full)


def test_a_sharded_sample_draws_its_slice_of_the_full_mask():
    ids = torch.arange(6)
    full = _mask(ids, SHAPE)
    for dim in (1, 2):  # heads (tensor parallel), sequence (sequence parallel)
        n = 2 if dim == 1 else 5
        for index in range(n):
            local_shape = list(SHAPE)
            local_shape[dim] //= n
            local = _mask(ids, local_shape, shard=(dim, index, n))
            assert torch.equal(local, full.narrow(dim, index * local_shape[dim], local_shape[dim]))


def test_masks_differ_by_site_sample_and_seed_and_keep_about_one_minus_p():
    ids = torch.arange(32)
    shape = (32, 2, 16, 16)
    kw = dict(p=0.3, sample_shape=shape[1:])
    a = rng.keep_mask(ids, shape, site=1, **kw)
    assert not torch.equal(a, rng.keep_mask(ids, shape, site=2, **kw))
    assert not torch.equal(a, rng.keep_mask(ids + 32, shape, site=1, **kw))
    assert not torch.equal(a, rng.keep_mask(ids, shape, site=1, seed=1, **kw))
    assert rng.expected_keep_fraction_ok(a, 0.3)
    assert abs(a.float().mean().item() - 0.7) < 0.02


def test_dropout_scales_kept_values_and_passes_gradients_through_the_mask():
    x = torch.ones(4, 8, requires_grad=True)
    y = rng.dropout(x, torch.arange(4), p=0.25, site=7, sample_shape=(8,))
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)


def test_graph_pass_and_eager_reference_draw_the_same_masks():
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden=16, layers=2, heads=4, vocab=32, seq=8, dropout=0.2))
    tokens = torch.randint(0, 32, (4, 8))
    gm = fx_trace(model, (tokens, tokens.clone()), loss_fn=gpt_loss)
    assert replace_dropout(gm, train=True, seed=0)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[-1] == SAMPLE_IDS
    assert sum(n.target is rng.dropout for n in gm.graph.nodes) == 1 + 3 * 2  # emb + 3 per layer
    assert not any(
        isinstance(gm.get_submodule(n.target), nn.Dropout) for n in gm.graph.nodes if n.op == "call_module"
    )
    ids = torch.arange(4) + 40
    eager = rng.make_deterministic(model)
    with rng.sample_ids(ids):
        expected = gpt_loss(eager(tokens), tokens)
    assert torch.equal(gm(tokens, tokens.clone(), ids), expected)


def test_inference_removes_dropout():
    model = GPT(GPTConfig(hidden=16, layers=1, heads=4, vocab=32, seq=8, dropout=0.2)).eval()
    tokens = torch.randint(0, 32, (2, 8))
    gm = fx_trace(model, (tokens,))
    assert not replace_dropout(gm, train=False)
    assert not any(n.op == "call_module" and "drop" in str(n.target) for n in gm.graph.nodes)
    assert torch.equal(gm(tokens), model(tokens))

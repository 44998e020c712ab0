"""Tracing: fx graphs of a model with its loss, and their analysis into an OpGraph."""

from __future__ import annotations

import pytest
import torch

from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.tracing import fx_trace

TINY = GPTConfig(hidden=32, layers=2, heads=4, vocab=64, seq=8, dropout=0.0)


def _tiny_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.vocab, (batch, TINY.seq), generator=g)
    targets = torch.randint(0, TINY.vocab, (batch, TINY.seq), generator=g)
    return tokens, targets


@pytest.mark.parametrize("tracer", ["symbolic_trace", "export"])
def test_fx_trace_graph_computes_the_eager_loss(tracer):
    """The traced GraphModule (model + loss) returns the eager loss; every node has shape meta."""
    torch.manual_seed(0)
    model = GPT(TINY)
    tokens, targets = _tiny_inputs()
    gm = fx_trace(model, (tokens, targets), loss_fn=gpt_loss, tracer=tracer)
    assert gm.meta["autopar"]["tracer"] == tracer
    assert gm.meta["autopar"]["input_names"] == ["tokens"]
    assert gm.meta["autopar"]["target_names"] == ["targets"]
    torch.testing.assert_close(gm(tokens, targets), gpt_loss(model(tokens), targets))
    names = {n for n, _ in gm.named_parameters()}
    assert "model.layers.0.attn.q_proj.weight" in names
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            assert "tensor_meta" in node.meta, node.format_node()
    linears = [n for n in gm.graph.nodes if n.meta.get("nn_module_stack") and "q_proj" in str(n.target)]
    linears = linears or [
        n
        for n in gm.graph.nodes
        if list(n.meta.get("nn_module_stack", {}).values())[-1:]
        and list(n.meta["nn_module_stack"].values())[-1][0].endswith("layers.0.attn.q_proj")
    ]
    assert linears, "no node carries the module path of layers.0.attn.q_proj"
    assert "gpt.py" in linears[0].meta.get("stack_trace", "")

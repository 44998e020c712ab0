"""Models beyond decoder transformers, as :class:`~autopar.testing.equivalence.Case` s.

The soundness suite (``tests/test_zoo.py``) runs each under dp=2, tp=2, pp=2 and a 4-rank mix and
compares losses, gradients and updated parameters with one device; ``scripts/zoo_check.py`` prints
the same as a table. Every builder seeds its own weights, so two calls give the same model.

The zoo covers the op families a user brings: convolutions with BatchNorm and pooling (ResNet,
a ``nn.Sequential`` CNN), a ViT (patch convolution, class token, SDPA), encoder-decoder models
whose decoder inputs are built by in-place writes (HF T5, BART), a recurrent model (``nn.LSTM``,
tuple outputs), a plain stack of Linear layers of unequal widths, HF GPT-2 with tied embeddings and
dropout on, and a model returning a dict with the loss computed outside.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autopar.testing.equivalence import Case, token_batches

__all__ = ["CASES", "case", "names"]


# ------------------------------------------------------------------------------- data
def image_batches(batch: int, steps: int, classes: int = 10, size: int = 16, seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(steps)
    ]


def vector_batches(batch: int, steps: int, inputs: int = 8, classes: int = 4, seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, inputs, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(steps)
    ]


def seq2seq_batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 1) -> list[tuple]:
    """``(input_ids, labels)``: the model builds its decoder inputs from the labels itself."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(3, vocab, (batch, seq), generator=g),
            torch.randint(3, vocab, (batch, seq), generator=g),
        )
        for _ in range(steps)
    ]


def classify_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def dict_loss(output: dict, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output["logits"], target) + 0.1 * output["aux"].pow(2).mean()


def hf_lm_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, a projection shortcut when the
    shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet-18-shaped image classifier (two stages of two basic blocks)."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(
            dim, 3 * dim, bias=False
        )  # a key bias has an analytically zero gradient: Adam turns its fp32 noise into updates
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer: patch convolution, class token, learned positions, blocks."""

    def __init__(
        self,
        dim: int = 32,
        heads: int = 4,
        layers: int = 2,
        patch: int = 4,
        size: int = 16,
        classes: int = 10,
    ):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class LSTMLM(nn.Module):
    """Embedding, a two-layer ``nn.LSTM`` (tuple output), a Linear head."""

    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(tokens))
        return self.head(out)


class WideMLP(nn.Module):
    """Five Linear layers of unequal widths, as attributes (no ModuleList, no Sequential)."""

    def __init__(self, widths: tuple[int, ...] = (8, 32, 48, 24, 16, 4)):
        super().__init__()
        self.fc1 = nn.Linear(widths[0], widths[1])
        self.fc2 = nn.Linear(widths[1], widths[2])
        self.fc3 = nn.Linear(widths[2], widths[3])
        self.fc4 = nn.Linear(widths[3], widths[4])
        self.fc5 = nn.Linear(widths[4], widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.tanh(self.fc3(x))
        x = torch.relu(self.fc4(x))
        return self.fc5(x)


def sequential_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class DictModel(nn.Module):
    """Returns ``{"logits", "aux"}``; the loss is computed outside from both."""

    def __init__(self, inputs: int = 8, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.cls = nn.Linear(hidden, classes)
        self.aux = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": self.cls(h), "aux": self.aux(h)}


class Seq2SeqWithLoss(nn.Module):
    """A HuggingFace encoder-decoder called with ``labels=``: it shifts the labels into decoder
    inputs itself (in-place writes) and returns its own loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=labels).loss


def _hf_seq2seq(kind: str) -> nn.Module:
    import transformers

    if kind == "t5":
        cfg = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return Seq2SeqWithLoss(transformers.T5ForConditionalGeneration(cfg))
    cfg = transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    return Seq2SeqWithLoss(transformers.BartForConditionalGeneration(cfg))


def _hf_gpt2_dropout() -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16, resid_pdrop=0.1, embd_pdrop=0.1,
        attn_pdrop=0.1, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


_BUILDERS = {
    "resnet": ResNet,
    "vit": ViT,
    "t5": functools.partial(_hf_seq2seq, "t5"),
    "bart": functools.partial(_hf_seq2seq, "bart"),
    "lstm": LSTMLM,
    "wide-mlp": WideMLP,
    "seq-cnn": sequential_cnn,
    "gpt2-dropout": _hf_gpt2_dropout,
    "dict-out": DictModel,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _BUILDERS[name]()


ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-4)
"""The zoo's optimizer. Adam's update ``m / (sqrt(v) + eps)`` is scale-free, so a gradient near
zero (1e-7 where the median is 1e-2: BatchNorm'd convolutions, T5's unscaled attention) whose fp32
rounding differs between one device and several ranks (~5e-9, another summation order) moves the
weight by a visibly different ~1e-6 at eps=1e-6. eps=1e-4 keeps such rounding below the
tolerance while every real gradient (>= 1e-3 here) still dominates eps; the gradients themselves
are compared before the optimizer at rtol 1e-5."""


def case(name: str, batch: int = 8) -> Case:
    """The zoo's case ``name`` (see :data:`CASES`)."""
    data = {
        "resnet": (functools.partial(image_batches, batch), classify_loss, 1),
        "vit": (functools.partial(image_batches, batch), classify_loss, 1),
        "t5": (functools.partial(seq2seq_batches, 64, batch, 8), None, 0),
        "bart": (functools.partial(seq2seq_batches, 64, batch, 8), None, 0),
        "lstm": (functools.partial(token_batches, 64, batch, 8), token_loss, 1),
        "wide-mlp": (functools.partial(vector_batches, batch), classify_loss, 1),
        "seq-cnn": (functools.partial(image_batches, batch), classify_loss, 1),
        "gpt2-dropout": (functools.partial(token_batches, 64, batch, 8), hf_lm_loss, 1),
        "dict-out": (functools.partial(vector_batches, batch), dict_loss, 1),
    }
    make_batches, loss_fn, num_targets = data[name]
    return Case(
        name=name,
        build=functools.partial(build, name, 0),
        make_batches=make_batches,
        loss_fn=loss_fn,
        global_batch=batch,
        num_targets=num_targets,
        optimizer=ADAMW,
    )


CASES = tuple(_BUILDERS)
"""Names of the zoo's models."""


def names() -> list[str]:
    return list(CASES)


# ------------------------------------------------------------------------------- plans
PLANS = ("dp2", "tp2", "pp2", "dp2pp2", "dp2tp2")
"""The plans every zoo model is checked under: 2 ranks each way and two 4-rank mixes."""

BATCHNORM_MODELS = frozenset({"resnet"})
"""Models with train-mode BatchNorm: one device normalises over the whole batch, so their plans
keep one micro-batch per data-parallel replica (``batchnorm="sync"``, docs/compiler.md)."""


HF_MODELS = frozenset({"t5", "bart", "gpt2-dropout"})
"""Export-traced HuggingFace models: each rank traces for seconds, so their checks use the pipeline
and one 4-rank mix (dp=2 x tp=2, which composes the dp and tp paths the 2-rank plans check alone)."""

HF_PLANS = ("pp2", "dp2tp2")


def plans_for(name: str) -> tuple[str, ...]:
    """The plan kinds zoo model ``name`` is checked under."""
    return HF_PLANS if name in HF_MODELS else PLANS


def plan(name: str, kind: str, global_batch: int = 8) -> Any:
    """The plan ``kind`` (one of :data:`PLANS`) for zoo model ``name``. Pipelines run two
    micro-batches per replica, except on BatchNorm models (one, see :data:`BATCHNORM_MODELS`)."""
    import autopar

    dp = 2 if "dp2" in kind else 1
    tp = 2 if "tp2" in kind else 1
    pp = 2 if "pp2" in kind else 1
    per_replica = global_batch // dp
    mbs = per_replica if name in BATCHNORM_MODELS or pp == 1 else per_replica // 2
    return autopar.Plan.manual(dp=dp, tp=tp, pp=pp, global_batch=global_batch, micro_batch_size=mbs)

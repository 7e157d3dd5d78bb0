"""Every optimizer trains a tiny LLaMA on real text (C4, t5-base tokenizer) from ``../shared``.

For each name in ``osd.optimizer_names()`` a seeded 2-layer ``LlamaForCausalLM`` takes 20
steps on packed C4 sequences; then

1. the loss on held-out sequences (documents never trained on) must fall by > 1 nat
   (ln 32100 = 10.4 at initialization; every optimizer reaches 7.8-8.7 here);
2. putting the attention and MLP weights (the projected ones) back to their initial values
   must raise that loss again by > 0.2 nat (observed 0.4-5.8), so the subspace updates did
   useful work rather than the full-rank embeddings alone;
3. subspace optimizers must hold projection matrices and full-rank ones none.

Skipped where ``../shared`` is absent. About 2-3 s per optimizer on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch

import osd
from tests.helpers import T5_VOCAB, tiny_llama

transformers = pytest.importorskip("transformers", reason="the tiny LLaMA needs `transformers`")

STEPS = 20
BATCH = 4
HELD_OUT = 16  # the last packed sequences, i.e. the last documents of the sample
TARGETS = ("self_attn", "mlp")  # LLaMA's projected Linear layers (q, k, v, o, gate, up, down)

# Per inner rule: a learning rate that trains this model well in 20 steps. Lion's sign
# update needs ~5-10x less than AdamW; SGD's scale is the gradient's own, so it needs far more.
# Muon (RMS 0.2 updates) needs more than AdamW, whose first steps have RMS ~1.
LR = {"adamw": 1e-2, "lion": 2e-3, "adafactor": 1e-2, "sgd": 0.1, "muon": 5e-2}
MIN_DROP = 1.0
MIN_PROJECTED_GAIN = 0.2


@torch.no_grad()
def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    return model(input_ids=tokens, labels=tokens).loss.item()


@pytest.mark.parametrize("name", osd.optimizer_names())
def test_tiny_llama_learns_c4(name: str, c4_tokens: torch.Tensor) -> None:
    assert c4_tokens.max().item() < T5_VOCAB
    train, held_out = c4_tokens[:-HELD_OUT], c4_tokens[-HELD_OUT:]
    model = tiny_llama()
    method, _, rule = name.rpartition("_")
    subspace = {"rank": 8, "update_proj_gap": 10, "scale": 1.0} if method else {}
    optimizer = osd.create_optimizer(model, name, lr=LR[rule], target_modules=TARGETS, **subspace)

    initial_weights = {n: p.detach().clone() for n, p in model.named_parameters() if any(t in n for t in TARGETS)}
    assert len(initial_weights) == 2 * 7
    initial_loss = lm_loss(model, held_out)

    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = train[torch.randint(len(train), (BATCH,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final_loss = lm_loss(model, held_out)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in initial_weights:
                p.copy_(initial_weights[n])
    reverted_loss = lm_loss(model, held_out)

    summary = f"{name}: held-out loss {initial_loss:.3f} -> {final_loss:.3f}, {reverted_loss:.3f} with attn/mlp reverted"
    assert final_loss < initial_loss - MIN_DROP, summary
    assert reverted_loss > final_loss + MIN_PROJECTED_GAIN, summary
    projection_bytes = osd.state_bytes(optimizer)["projection"]
    assert (projection_bytes > 0) == bool(method), f"{summary}; projection state {projection_bytes} bytes"

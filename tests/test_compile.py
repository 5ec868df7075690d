"""``compile: true`` compiles the encoder layers without changing what they compute (CPU inductor)."""

import pytest
import torch

from cpt_lightning.objectives import CausalLM, MaskedLM
from helpers import packed_position_ids, tiny_module


def loss_and_grads(module, objective):
    g = torch.Generator().manual_seed(3)
    batch = {
        "input_ids": torch.randint(5, 50000, (2, 40), generator=g),
        "position_ids": torch.stack([packed_position_ids([25, 15]), packed_position_ids([40])]),
    }
    module.set_objective(objective)
    module.zero_grad()
    loss, _, _ = module.objective_step(batch, torch.Generator().manual_seed(5))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiled variants: those of tests run before it in the same process (every layer
    shares one code object) count towards dynamo's limit of 8 too, and a test that met a full cache would run eager
    where it asserts it stays compiled."""
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients(tokenizer_dir):
    eager = tiny_module(tokenizer_dir, attn_implementation="sdpa")
    compiled = tiny_module(tokenizer_dir, attn_implementation="sdpa")
    compiled.compile_model()
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in compiled.model.model.layers)
    for objective in (CausalLM(), MaskedLM(), CausalLM()):  # back to CLM: a switch must not reuse a stale graph
        expected_loss, expected_grads = loss_and_grads(eager, objective)
        loss, grads = loss_and_grads(compiled, objective)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_flex_layers_take_each_steps_block_masks_without_recompiling(tokenizer_dir):
    """The GPU path's new BlockMask every step is a graph input, not a guard (forward only: no CPU backward).

    The warm-up runs twice: from transformers 5.25 ModernBERT's attention runs inside the kernels package's
    hook, whose context variable the first compiled call leaves set, so the second call compiles one more
    variant (once per run: 7 graphs instead of 6 here, then none over further steps).
    """
    module = tiny_module(tokenizer_dir, attn_implementation="flex_attention", model_config={"max_position_embeddings": 512}).eval()
    module.compile_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50000, (2, 256), generator=g)

    def forward(lengths, attention, input_ids=ids):
        with torch.no_grad():
            return module(input_ids, torch.stack([packed_position_ids(lengths)] * 2), attention).logits

    for _ in range(2):
        for attention in ("causal", "bidirectional"):
            forward([100, 156], attention)  # compiles this kind's graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([30, 200, 26], [128, 128], [5, 5, 246]):
            first = lengths[0]
            other_docs = ids.clone()
            other_docs[:, first:] = torch.randint(5, 50000, (2, 256 - first), generator=g)
            for attention in ("causal", "bidirectional"):
                before, after = forward(lengths, attention), forward(lengths, attention, other_docs)
                torch.testing.assert_close(after[:, :first], before[:, :first], rtol=0, atol=0)  # the first document sees nothing else


@pytest.mark.slow
def test_a_compiled_freeze_run_validating_during_clm_stays_compiled(tokenizer_dir, caplog):
    """Every layer shares one code object: layer 0, validation (no grad), frozen weights and a short
    validation batch made 9 variants of it, past dynamo's default limit of 8, and the rest ran eager."""
    import logging

    import lightning as L

    from callbacks import LayerFreeze, ObjectiveSchedule, Phase
    from test_objective_schedule import ROWS, TOKENS_PER_STEP, PackedRows

    module = tiny_module(tokenizer_dir, compile=True, model_config={"num_hidden_layers": 22, "global_attn_every_n_layers": 3})
    phases = [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, val_check_interval=1, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, callbacks=[ObjectiveSchedule(phases), LayerFreeze("0-7")],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    rows = torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    three_rows = torch.utils.data.DataLoader([row for row, _ in zip(PackedRows(), range(3))], batch_size=ROWS)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        trainer.fit(module, rows, three_rows)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage() or "cache_size_limit" in r.getMessage()]

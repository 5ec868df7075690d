"""A researcher's own objective, plugged in by class_path: mistakes are named, the card describes it."""

import re

import pytest
import torch

from callbacks import ObjectiveSchedule, Phase
from cpt_lightning.errors import UserError
from cpt_lightning.model_card import describe_objective
from cpt_lightning.objectives import IGNORE_INDEX, CausalLM, MaskedLM
from helpers import tiny_module
from test_objective_schedule import TOKENS_PER_STEP, fit


class Casual(CausalLM):
    attention = "casual"  # a typo the mask builders read as bidirectional: next-token labels saw the future


class Nameless(CausalLM):
    name = ""


class BidirectionalNamedClm(MaskedLM):
    name = "clm"  # shares CausalLM's name: curves, LayerFreeze's during: and export folders merged


class ShortLabels(CausalLM):
    name = "short"

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        return inputs, labels[:, 1:]


class WholeWordMLM(MaskedLM):
    name = "wwm"

    def __init__(self, mask_rate: float = 0.15, max_word_pieces: int = 4):
        super().__init__(mask_rate)
        self.max_word_pieces = max_word_pieces


def test_the_card_gives_a_masked_lm_subclasss_own_settings_too():
    """Only mask_rate and the 80/10/10 split were said: max_word_pieces=4 was left out."""
    spec = {"class_path": "test_custom_objectives.WholeWordMLM", "init_args": {"mask_rate": 0.3, "max_word_pieces": 4}}
    assert describe_objective(spec) == ("WWM (WholeWordMLM, bidirectional attention, 30% of tokens masked: 80% mask "
                                        "token / 10% random / 10% unchanged; max_word_pieces=4)")


def test_an_objective_the_card_cannot_build_is_said_once(capsys):
    spec = {"class_path": "not_on_this_path.SpanLM", "init_args": {"span": 3}}
    assert describe_objective(spec) == describe_objective(spec) == "`not_on_this_path.SpanLM` {'span': 3}"
    err = capsys.readouterr().err
    assert err.count("note: the model card describes not_on_this_path.SpanLM from the run config") == 1
    assert "a causal phase's notice and tag may be missing" in err


def test_the_card_gives_a_custom_objectives_settings_as_they_are():
    """Reading mask_token_ratio from any objective with a mask_rate crashed cpt export for docs/objectives.md's own
    example; then the card called its mask_rate 0.2 "20% of tokens masked", though its spans of 4 mask about 18.9%,
    and left span_length out."""
    span = {"class_path": "custom_objectives.SpanMaskedLM", "init_args": {"mask_rate": 0.2, "span_length": 4}}
    assert describe_objective(span) == "SPAN_MLM (SpanMaskedLM, bidirectional attention; mask_rate=0.2, span_length=4)"


class Slashed(CausalLM):
    name = "span/5"  # val/span/5_loss read as source "span"; the phase-end export nested phase1-span/5


class OldSignature(CausalLM):
    """build_inputs written to take the batch dict (an earlier design's interface)."""

    def build_inputs(self, batch):
        return super().build_inputs(batch["input_ids"], batch["position_ids"], None)


class LossWithoutLabels(CausalLM):
    def loss(self, logits):
        return logits.mean()


class LossWithAMask(CausalLM):
    def loss(self, logits, labels, mask):
        return logits.mean()


class LearnedTemperature(CausalLM):
    """A learned loss temperature: never in the optimizer, its gradient grew until NonFiniteGuard stopped the run."""

    def __init__(self):
        self.log_temperature = torch.nn.Parameter(torch.zeros(()))


class WithAHead(CausalLM):
    def __init__(self, frozen: bool):
        self.head = torch.nn.Linear(2, 2).requires_grad_(not frozen)


class TemperaturesInAList(CausalLM):
    def __init__(self):
        self.temperatures = [torch.nn.Parameter(torch.zeros(()))]


class HeadsInADict(CausalLM):
    def __init__(self):
        self.heads = {"a": torch.nn.Linear(2, 2)}


class WeightMadeInBind(CausalLM):
    """A weight sized by the vocabulary, made where the vocabulary is known."""

    name = "biased"

    def bind(self, tokens):
        super().bind(tokens)
        self.bias = torch.nn.Parameter(torch.zeros(tokens.vocab_size))


class ModuleObjective(CausalLM, torch.nn.Module):
    """Registered as the module's submodule: its phase's checkpoints loaded under no other objective."""

    def __init__(self):
        torch.nn.Module.__init__(self)


@pytest.mark.parametrize("objective, message", [
    (LearnedTemperature(), "LearnedTemperature.log_temperature: trainable weights in an objective are neither "
                           "optimised nor checkpointed"),
    (WithAHead(frozen=False), "WithAHead.head: trainable weights"),
    (ModuleObjective(), "ModuleObjective is a torch.nn.Module: an objective is a plain class"),
    (TemperaturesInAList(), "TemperaturesInAList.temperatures: trainable weights"),
    (HeadsInADict(), "HeadsInADict.heads: trainable weights"),
    (Casual(), "Casual.attention='casual': must be 'causal' or 'bidirectional'"),
    (Nameless(), "Nameless.name='': must be a non-empty name"),
    (Slashed(), r"Slashed.name='span/5': must be 1 to 64 letters, digits, '_' or '-' \(it names the curves"),
    # a '.' failed at the phase's switch (a torch module key), 300 characters at its phase-end export
    *[(type("Renamed", (MaskedLM,), {"name": name})(), rf"Renamed.name={re.escape(repr(name))}: must be 1 to 64 letters")
      for name in ("mlm0.3", "L" * 65, "a\x00b", "a:b*c?", "span 5")],
    (OldSignature(), r"OldSignature.build_inputs\(batch\) cannot be called as build_inputs\(input_ids, position_ids, "
                     r"generator\): see docs/objectives.md"),
    (LossWithoutLabels(), r"LossWithoutLabels.loss\(logits\) cannot be called as loss\(logits, labels\)"),
    (LossWithAMask(), r"LossWithAMask.loss\(logits, labels, mask\) cannot be called as loss\(logits, labels\)"),
])
def test_an_objective_with_a_bad_attention_name_or_signature_is_refused(objective, message):
    with pytest.raises(UserError, match=message):
        ObjectiveSchedule([Phase(objective, tokens=TOKENS_PER_STEP)])


def test_an_objective_may_keep_a_frozen_module_or_fixed_tensors():
    fixed = MaskedLM()
    fixed.table, fixed.weights = torch.ones(3), [torch.zeros(2)]
    ObjectiveSchedule([Phase(WithAHead(frozen=True), tokens=TOKENS_PER_STEP), Phase(fixed, tokens=TOKENS_PER_STEP)])


def test_a_weight_an_objective_makes_in_bind_is_refused(tokenizer_dir):
    with pytest.raises(UserError, match=r"WeightMadeInBind.bias: trainable weights in an objective"):
        tiny_module(tokenizer_dir, objective=WeightMadeInBind())
    with pytest.raises(UserError, match=r"WeightMadeInBind.bias: trainable weights in an objective"):
        tiny_module(tokenizer_dir, val_objectives={"clm": WeightMadeInBind()})


def test_two_different_objectives_under_one_name_are_refused():
    with pytest.raises(UserError, match=r"phases\[1\] \(BidirectionalNamedClm\) and phases\[0\] \(CausalLM\) are both named 'clm'"):
        ObjectiveSchedule([Phase(CausalLM(), tokens=TOKENS_PER_STEP), Phase(BidirectionalNamedClm(), tokens=TOKENS_PER_STEP)])
    # one class whose attention is a setting: a causal and a bidirectional phase under one name mixed their curves
    with pytest.raises(UserError, match=r"phases\[1\] \(Attending\) and phases\[0\] \(Attending\) are both named 'clm'"):
        ObjectiveSchedule([Phase(Attending("causal"), tokens=TOKENS_PER_STEP),
                           Phase(Attending("bidirectional"), tokens=TOKENS_PER_STEP)])
    # the MLM baseline's two MLM phases (30% then 15%) are one objective at two rates: allowed
    ObjectiveSchedule([Phase(MaskedLM(mask_rate=0.3), tokens=TOKENS_PER_STEP), Phase(MaskedLM(), tokens=TOKENS_PER_STEP)])


class Attending(CausalLM):
    def __init__(self, attention: str):
        super().__init__()
        self.attention = attention


def test_inputs_of_the_wrong_shape_are_named_before_the_model_sees_them(tokenizer_dir):
    module = tiny_module(tokenizer_dir)
    module.set_objective(ShortLabels())
    batch = {"input_ids": torch.randint(0, 50000, (2, 16)), "position_ids": torch.arange(16).repeat(2, 1)}
    with pytest.raises(UserError, match=r"ShortLabels.build_inputs returned input_ids \[2, 16\] and labels \[2, 15\]"):
        module.objective_step(batch, torch.Generator())


class Returns(CausalLM):
    """An objective whose build_inputs returns ``what(inputs, labels)``."""

    name = "returns"

    def __init__(self, what):
        self.what = what

    def build_inputs(self, input_ids, position_ids, generator):
        return self.what(*super().build_inputs(input_ids, position_ids, generator))


@pytest.mark.parametrize("what, found", [
    (lambda inputs, labels: None, "a NoneType"),
    (lambda inputs, labels: (inputs, labels, labels), "a tuple"),
    (lambda inputs, labels: {"input_ids": inputs, "labels": labels}, "a dict"),
    (lambda inputs, labels: (inputs, labels != IGNORE_INDEX), r"input_ids \[2, 16\] and labels \[2, 16\] \(torch.int64, torch.bool\)"),
], ids=["no-return", "three", "dict", "bool-labels"])
def test_a_build_inputs_that_breaks_the_contract_is_named_in_one_line(tokenizer_dir, what, found):
    """A forgotten return, a third value, a dict or boolean labels were tracebacks from the unpacking or inside torch."""
    module = tiny_module(tokenizer_dir)
    module.set_objective(Returns(what))
    batch = {"input_ids": torch.randint(0, 50000, (2, 16)), "position_ids": torch.arange(16).repeat(2, 1)}
    with pytest.raises(UserError, match=rf"^Returns.build_inputs returned {found}: it must return \(input_ids, labels\)"):
        module.objective_step(batch, torch.Generator())


@pytest.mark.parametrize("loss_chunk_size", [4096, None], ids=["fused", "dense"])
def test_int32_labels_train_on_either_loss_path(tokenizer_dir, loss_chunk_size):
    """The fused loss took them and F.cross_entropy refused them: the same objective worked or not by loss_chunk_size."""
    module = tiny_module(tokenizer_dir, loss_chunk_size=loss_chunk_size)
    module.set_objective(Returns(lambda inputs, labels: (inputs, labels.int())))
    batch = {"input_ids": torch.randint(0, 50000, (2, 16)), "position_ids": torch.arange(16).repeat(2, 1)}
    loss, _, targets = module.objective_step(batch, torch.Generator())
    assert torch.isfinite(loss) and targets.numel() == 2 * 15


class RefusesTheTokenizer(MaskedLM):
    name = "picky"

    def bind(self, tokens):
        super().bind(tokens)
        raise UserError("RefusesTheTokenizer: not this vocabulary")


class ForgetsSuperBind(MaskedLM):
    """Checks the tokenizer, but keeps none of it: MaskedLM's tables are never made."""

    name = "forgetful"

    def bind(self, tokens):
        assert tokens.mask_id is not None


class PerPositionLoss(MaskedLM):
    name = "per_position"

    def loss(self, logits, labels):
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


class IntegerLoss(MaskedLM):
    name = "integer"

    def loss(self, logits, labels):
        return (logits.argmax(-1) != labels).sum()


@pytest.mark.parametrize("later, refusal", [
    (RefusesTheTokenizer(), "RefusesTheTokenizer: not this vocabulary"),
    (Returns(lambda inputs, labels: None), "Returns.build_inputs returned a NoneType"),
    (PerPositionLoss(), r"PerPositionLoss.loss returned a torch.float32 tensor of shape \[\d+\] on the first batch: it "
                        "must return the mean over the predicted positions, a 0-dimensional float tensor"),
    (IntegerLoss(), r"IntegerLoss.loss returned a torch.int64 tensor of shape \[\] on the first batch without a "
                    "gradient"),
    (WeightMadeInBind(), r"WeightMadeInBind.bias: trainable weights in an objective"),
    (ForgetsSuperBind(), r"ForgetsSuperBind.bind does not call super\(\).bind\(tokens\)"),
    (Returns(lambda inputs, labels: (inputs, torch.where(labels == IGNORE_INDEX, labels, labels + 60_000))),
     r"Returns.build_inputs gave labels from 6\d{4} to \d+ on the first batch: each is a token id in \[0, \d+\) "
     "or -100"),
    (Returns(lambda inputs, labels: (inputs, torch.where(labels == IGNORE_INDEX, -1, labels))),
     r"Returns.build_inputs gave labels from -1 to \d+ on the first batch"),
    # an index error in the embedding at the phase's first step (a device assert on CUDA)
    (Returns(lambda inputs, labels: (inputs + 10**6, labels)),
     r"Returns.build_inputs gave input ids from 10\d{5} to \d+ on the first batch: each is a token id in \[0, \d+\)$"),
    (Returns(lambda inputs, labels: (inputs * 0 - 5, labels)), r"Returns.build_inputs gave input ids from -5 to -5 "),
], ids=["bind", "build_inputs", "per-position-loss", "integer-loss", "weight-made-in-bind", "bind-without-super",
        "labels-past-the-vocabulary", "negative-labels", "inputs-past-the-vocabulary", "negative-inputs"])
def test_a_later_phases_objective_is_checked_before_the_first_step(tokenizer_dir, later, refusal):
    """Bound and tried only at its switch, it was refused after the phases before it trained (50B tokens in); a
    per-position loss failed inside torchmetrics there."""
    from test_objective_schedule import Recorder

    recorder = Recorder()
    with pytest.raises(UserError, match=refusal):
        fit(tokenizer_dir, [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP), Phase(later, tokens=TOKENS_PER_STEP)],
            callbacks_extra=[recorder])
    assert recorder.objectives == []


class MasksInPlace(MaskedLM):
    """Masks as transformers' data collator does, by writing into the inputs it is given."""

    name = "inplace"

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        input_ids.copy_(inputs)
        return input_ids, labels


def test_an_objective_that_writes_into_its_inputs_leaves_the_batch_as_it_was(tokenizer_dir):
    """The live batch was handed over: the validation objectives after it, and the first step after every phase's
    check, saw its masks."""
    module = tiny_module(tokenizer_dir)
    batch = {"input_ids": torch.randint(1000, 50000, (2, 16)), "position_ids": torch.arange(16).repeat(2, 1)}
    before = {key: value.clone() for key, value in batch.items()}
    objective = MasksInPlace(mask_rate=0.5)
    objective.bind(module.tokens)
    module.check_objective_on(objective, batch)
    module.objective_step(batch, torch.Generator().manual_seed(0), objective)
    assert all(torch.equal(batch[key], before[key]) for key in batch)


class CountsItsCalls(MaskedLM):
    """A curriculum of its own: what it does next depends on how many batches it has built and scored."""

    name = "counting"

    def __init__(self):
        super().__init__()
        self.built = self.scored = 0

    def build_inputs(self, input_ids, position_ids, generator):
        self.built += 1
        return super().build_inputs(input_ids, position_ids, generator)

    def loss(self, logits, labels):
        self.scored += 1
        return torch.nn.functional.cross_entropy(logits.float(), labels)


def test_the_first_batch_check_tries_a_copy_and_an_objective_that_does_not_copy_is_still_built_once(tokenizer_dir):
    """The check built the live objective's inputs (only its loss was tried on a copy): a curriculum counting its
    batches counted one more at every run start and resume. One that cannot be copied (it holds a handle) is
    still built once and refused when it breaks the contract."""
    import threading

    module = tiny_module(tokenizer_dir)
    batch = {"input_ids": torch.randint(1000, 50000, (2, 16)), "position_ids": torch.arange(16).repeat(2, 1)}
    objective = CountsItsCalls()
    objective.bind(module.tokens)
    module.check_objective_on(objective, batch)
    assert (objective.built, objective.scored) == (0, 0)
    broken = Returns(lambda inputs, labels: None)
    broken.handle = threading.Lock()
    with pytest.raises(UserError, match="Returns.build_inputs returned a NoneType"):
        module.check_objective_on(broken, batch)


class NothingToPredict(CausalLM):
    name = "none"

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        return inputs, torch.full_like(labels, IGNORE_INDEX)


@pytest.mark.parametrize("loss_chunk_size", [4096, None], ids=["fused", "dense"])
def test_a_micro_batch_with_nothing_to_predict_backpropagates_a_zero_to_every_weight(tokenizer_dir, loss_chunk_size):
    """The dense path's mean over no position was NaN: NonFiniteGuard dropped the whole step as a
    divergence. Every weight a labelled micro-batch reaches gets a (zero) gradient too, so every rank
    of an FSDP2 run reduces the same gradients whichever of them had nothing to predict."""
    batch = {"input_ids": torch.randint(1000, 5000, (2, 16)), "position_ids": torch.arange(16).repeat(2, 1)}
    reached = {}
    for objective in (CausalLM(), NothingToPredict()):
        module = tiny_module(tokenizer_dir, loss_chunk_size=loss_chunk_size)
        module.set_objective(objective)
        loss, _, targets = module.objective_step(batch, torch.Generator())
        loss.backward()
        reached[objective.name] = {name for name, p in module.named_parameters() if p.grad is not None}
    assert targets.numel() == 0 and loss.item() == 0.0
    assert reached["none"] == reached["clm"]
    assert all(not p.grad.any() for p in module.parameters() if p.grad is not None)


def test_a_micro_batch_with_nothing_to_predict_trains_on(tokenizer_dir):
    """A targeted objective (say, masking only numbers) can leave a micro-batch without labels: the
    accuracy metric crashed on the empty tensors. A whole step without one leaves the weights as they were (its
    gradient divided by no position was NaN, which AdamW wrote into every weight)."""
    module, trainer, _ = fit(tokenizer_dir, [Phase(MaskedLM(mask_rate=1e-6), tokens=2 * TOKENS_PER_STEP)])
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


class NothingInRowsStartingWithZero(CausalLM):
    name = "targeted"

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        return inputs, torch.where(input_ids[:, :1] == 0, IGNORE_INDEX, labels)


def test_a_validation_micro_batch_with_nothing_to_predict_adds_nothing(tokenizer_dir):
    """It weighs nothing in the evaluation's loss and accuracy (an accuracy over no position is NaN, and a
    zero loss would pull the mean down)."""
    import lightning as L

    rows = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": rows, "position_ids": torch.arange(16).repeat(2, 1)}
    unlabelled = {**batch, "input_ids": torch.cat([torch.zeros_like(rows[:, :1]), rows[:, 1:]], dim=1)}
    module = tiny_module(tokenizer_dir, val_objectives={"targeted": NothingInRowsStartingWithZero()})

    def validate(batches):
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        (metrics,) = trainer.validate(module, torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)
        return metrics

    alone = validate([batch])
    assert validate([unlabelled, batch]) == pytest.approx(alone) and alone["val/targeted_loss"] > 0
    assert "val/targeted_loss" not in validate([unlabelled])  # nothing predicted at all: no 0.0, read as perfect


class PredictsNothing(CausalLM):
    name = "nothing"

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        return inputs, torch.full_like(labels, IGNORE_INDEX)


def test_a_step_that_predicts_nothing_logs_no_train_loss(tokenizer_dir):
    """Lightning logged the last step that predicted something again at every step after it: a flat fake curve."""
    from test_objective_schedule import MemoryLogger

    logger = MemoryLogger()
    fit(tokenizer_dir, [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP), Phase(PredictsNothing(), tokens=2 * TOKENS_PER_STEP),
                        Phase(CausalLM(), tokens=TOKENS_PER_STEP)], logger=logger, log_every_n_steps=1)
    assert [step for step, _ in logger.points["train/loss"]] == [0, 1, 4]


class InputsPastTheVocabulary(CausalLM):
    name = "past"
    offset = 10**6

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        return inputs + self.offset, labels


def test_a_validation_objective_is_checked_at_the_first_validation_batch(tokenizer_dir, monkeypatch):
    """A phase's objective is checked at the first training batch; a validation one's out-of-range ids were an index
    error in the sanity validation (a device assert on CUDA), in a 100-line traceback."""
    import lightning as L

    batch = {"input_ids": torch.randint(1000, 5000, (2, 16)), "position_ids": torch.arange(16).repeat(2, 1)}
    for objective, refusal in [(InputsPastTheVocabulary(), r"InputsPastTheVocabulary.build_inputs gave input ids from "
                                                           r"10\d{5} to \d+ on the first batch"),
                               (PerPositionLoss(), r"PerPositionLoss.loss returned a torch.float32 tensor of shape \[\d+\]")]:
        module = tiny_module(tokenizer_dir, val_objectives={"clm": CausalLM(), "custom": objective})
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        with pytest.raises(UserError, match=refusal):
            trainer.validate(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)
    module = tiny_module(tokenizer_dir, val_objectives={"clm": CausalLM(), "past": InputsPastTheVocabulary()})
    with pytest.raises(UserError, match="InputsPastTheVocabulary.build_inputs gave input ids"):
        trainer.validate(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)
    monkeypatch.setattr(InputsPastTheVocabulary, "offset", 0)  # fixed: checked again, not refused from memory
    (metrics,) = trainer.validate(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)
    assert metrics["val/past_loss"] == pytest.approx(metrics["val/clm_loss"])


class EntitySpans(MaskedLM):
    """Masks whole entity spans listed in a file: a path argument, and state that changes as it trains."""

    name = "entity_mlm"

    def __init__(self, spans_file: str, mask_rate: float = 0.15, max_span: int | None = None):
        super().__init__(mask_rate=mask_rate)
        self.spans_file, self.max_span, self.calls = spans_file, max_span, 0


def test_the_settings_a_checkpoint_records_are_the_numeric_constructor_arguments():
    """Strings are left out (a path moves with the machine: a resume on another cluster was refused), and so
    is what the object counts as it trains (a false refusal at every resume)."""
    from custom_objectives import SpanMaskedLM
    from cpt_lightning.objectives import objective_settings

    assert objective_settings(MaskedLM(0.3)) == {"mask_rate": 0.3, "mask_token_ratio": 0.8, "random_token_ratio": 0.1}
    assert objective_settings(CausalLM()) == {}
    assert objective_settings(SpanMaskedLM(span_length=5)) == {"mask_rate": 0.15, "span_length": 5}
    entity = EntitySpans("/scratch/a/spans.tsv", max_span=4)
    entity.calls = 7
    assert objective_settings(entity) == {"mask_rate": 0.15, "max_span": 4}
    assert objective_settings(EntitySpans("/b/spans.tsv"))["max_span"] is None


def test_the_span_example_masks_whole_spans_cut_at_each_documents_end():
    """docs/objectives.md's example: its spans ran on into the next document of a packed row."""
    from custom_objectives import SpanMaskedLM
    from cpt_lightning.objectives import TokenizerFacts

    objective, length = SpanMaskedLM(mask_rate=0.3, span_length=4), 64
    objective.bind(TokenizerFacts(mask_id=4, special_ids=(0, 4), vocab_size=100))
    input_ids = torch.randint(5, 100, (8, length), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(10), torch.arange(3), torch.arange(length - 13) % 5]).repeat(8, 1)
    inputs, labels = objective.build_inputs(input_ids, position_ids, torch.Generator().manual_seed(1))
    starts = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3 / 4
    document_start = (position_ids == 0).tolist()
    for row in range(8):
        for position in range(length):
            first = max(position - 3, 0)  # the span may start no further back than its document's first token
            first = max([first] + [p for p in range(first, position + 1) if document_start[row][p]])
            masked = bool(starts[row, first:position + 1].any())
            assert (labels[row, position] != IGNORE_INDEX) == masked, (row, position)
            assert inputs[row, position] == (4 if masked else input_ids[row, position])
    assert 0.15 < (labels != IGNORE_INDEX).float().mean() < 0.3

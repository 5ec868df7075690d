"""Pretrained models load with transformers' own layers: no Hub kernels swapped in (cpt_lightning.pretrained).

From transformers 5.25 ``from_pretrained`` kernelizes by default when the ``kernels`` package is there (5.25 requires
it): ModernBERT's rotary embedding on CUDA becomes a kernel downloaded from the Hub. Every load this project makes
asks for no kernels, on any version; the spy below sees what each load asked for.
"""

import pytest
import torch
from transformers import AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM, PreTrainedModel

from cpt_lightning import EncoderPretraining
from cpt_lightning.pretrained import from_pretrained_checked
from helpers import TINY


@pytest.fixture
def kernels_asked(monkeypatch) -> list:
    """The ``use_kernels`` of every ``from_pretrained`` call (None: left to transformers' default)."""
    asked = []
    load = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("use_kernels"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return asked


@pytest.fixture
def model_folder(tmp_path, modernbert_tokenizer):
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig(**TINY, vocab_size=len(modernbert_tokenizer)))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


def test_a_run_starting_from_a_pretrained_model_asks_for_no_hub_kernels(model_folder, tokenizer_dir, kernels_asked):
    folder, saved = model_folder
    module = EncoderPretraining(model=str(folder), tokenizer=str(tokenizer_dir))
    assert kernels_asked == [False]
    torch.testing.assert_close(module.model.model.embeddings.tok_embeddings.weight, saved.model.embeddings.tok_embeddings.weight)


def test_evaluation_and_analysis_load_with_no_hub_kernels(model_folder, kernels_asked):
    folder, saved = model_folder
    model = from_pretrained_checked(AutoModelForMaskedLM, str(folder), "the comparison would be of random weights")
    assert kernels_asked == [False]
    torch.testing.assert_close(model.decoder.weight, saved.decoder.weight)

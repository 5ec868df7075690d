"""cpt analyze: streaming linear CKA, weight drift, seed-noise ratios, outputs, layer transplants, and the probe:
a prepared source's holdout, the holdouts of a run's sources by weight, found from the models when not given."""

import copy
import json
import logging
import re
import shutil
from itertools import combinations
from pathlib import Path

import matplotlib.image
import pytest
import torch
from transformers import AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from cpt_lightning.analysis import main
from cpt_lightning.analysis.cka import StreamingCKA
from cpt_lightning.analysis.drift import relative_drift
from cpt_lightning.analysis.probe import NO_PROBE, load_probe, split_rows
from cpt_lightning.analysis.report import LayerMetrics, make_figure, save_plot
from cpt_lightning.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INIT_RANGE = 0.2  # large enough that each layer visibly transforms the residual stream
SEED_NOISE = 0.01


# -- helpers -------------------------------------------------------------------------------


def tiny_config(tokenizer, **overrides) -> ModernBertConfig:
    return ModernBertConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 2, "max_position_embeddings": 128, "initializer_range": INIT_RANGE,
        "pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id, **overrides,
    })


def trained_like(base: ModernBertForMaskedLM, seed: int, layer0_change: float) -> ModernBertForMaskedLM:
    """A 'continued-pretraining run' of base: a fixed change of layer 0 (the arm), plus small seed noise."""
    model = ModernBertForMaskedLM(base.config)
    model.load_state_dict(base.state_dict())
    arm, noise = torch.Generator().manual_seed(99), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            size = param.abs().mean()
            param += SEED_NOISE * size * torch.randn(param.shape, generator=noise)
            if name.startswith("model.layers.0."):
                param += layer0_change * size * torch.randn(param.shape, generator=arm)
    return model


def save(model, tokenizer, directory) -> str:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Textbook kernel form tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) with n × n Gram matrices."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = centre @ x @ x.T @ centre, centre @ y @ y.T @ centre
    return ((k * l).sum() / ((k * k).sum() * (l * l).sum()).sqrt()).item()


def test_a_pair_named_twice_is_measured_once():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x @ orthogonal(8, 1) + 0.5 * torch.randn(64, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cka = StreamingCKA([("x", "y"), ("x", "y")])
    cka.update({"x": [x], "y": [y]})
    assert cka.compute() == {("x", "y"): [pytest.approx(reference_cka(x, y), abs=1e-10)]}


def streamed_cka(x: torch.Tensor, y: torch.Tensor, batches: int = 4) -> float:
    cka = StreamingCKA([("x", "y")])
    for xb, yb in zip(x.chunk(batches), y.chunk(batches)):
        cka.update({"x": [xb], "y": [yb]})
    return cka.compute()[("x", "y")][0]


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, modernbert_tokenizer):
    """HF folders: a base, two 'detour' seeds (layer 0 rewritten) and two 'baseline' seeds (small noise)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer))
    runs = {"base": base}
    runs.update({f"detour{s}": trained_like(base, s, layer0_change=1.0) for s in (1, 2)})
    runs.update({f"baseline{s}": trained_like(base, s, layer0_change=0.0) for s in (3, 4)})
    return {name: save(model, modernbert_tokenizer, root / name) for name, model in runs.items()}


@pytest.fixture(scope="module")
def probe_file(sample_corpus):
    """Real PubMed abstracts (JSONL, field text); the tests read only their first few thousand tokens."""
    return str(sample_corpus.raw["pubmed"])


def run_main(*argv) -> int:
    return main([str(a) for a in argv])


def prepared_blocks(folder, block) -> torch.Tensor:
    from litdata import StreamingDataset, TokensLoader

    dataset = StreamingDataset(str(folder), item_loader=TokensLoader(block), shuffle=False)
    return torch.stack([torch.from_numpy(dataset[i].astype("int64")) for i in range(len(dataset))])


def write_run_config(path, sources):
    """What `cpt fit` saves: the resolved LightningCLI config, here only its data part."""
    import yaml

    data = {"class_path": "cpt_lightning.data.PackedDataModule",
            "init_args": {"sources": [{"name": s.name, "path": s.path, "weight": s.weight} for s in sources]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": data, "trainer": {"max_steps": 10}}))
    return path


def write_checkpoint(hf_folder, path):
    """A cpt fit checkpoint (weights under ``model.``, architecture in hyper_parameters) of an HF folder."""
    model = AutoModelForMaskedLM.from_pretrained(hf_folder)
    config = {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "max_position_embeddings")}
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": None, "model_config": config, "tokenizer": hf_folder},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


# -- CKA -----------------------------------------------------------------------------------


def test_streaming_cka_matches_the_kernel_form():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 12, generator=gen) + 5.0
    y = x[:, :8] @ torch.randn(8, 6, generator=gen) + 0.5 * torch.randn(200, 6, generator=gen)
    assert streamed_cka(x, y) == pytest.approx(reference_cka(x, y), abs=1e-10)


def test_cka_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    mix = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ mix) + torch.randn(300, 16, generator=gen, dtype=torch.float64)
    before = streamed_cka(x, y)
    assert 0.05 < before < 0.95, "features must be partly related for the invariance to mean anything"
    transformed = 7.5 * (y @ orthogonal(16, 3)) + 100.0  # rotate, scale, and shift by a large offset
    assert streamed_cka(x, transformed) == pytest.approx(before, abs=1e-9)
    assert streamed_cka(x, x @ orthogonal(16, 4) * 0.01) == pytest.approx(1.0, abs=1e-9)


def test_cka_of_unrelated_features_is_low():
    gen = torch.Generator().manual_seed(5)
    assert streamed_cka(torch.randn(2000, 8, generator=gen), torch.randn(2000, 8, generator=gen)) < 0.05


def test_cka_is_exact_next_to_a_large_constant_offset():
    """ModernBERT has outlier dimensions with large constant values. Summed raw, XᵀX holds offset² ≈ 1e12 per
    token and centring (XᵀX − n·x̄ᵀx̄) cancels the unit variance away in float64; the first-batch shift keeps it."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(8, 8, generator=gen, dtype=torch.float64) + torch.randn(400, 8, generator=gen, dtype=torch.float64)
    outlier = y.clone()
    outlier[:, 0] += 1e6  # CKA ignores a shift: the value must not move
    assert streamed_cka(x, outlier) == pytest.approx(streamed_cka(x, y), abs=1e-10)


# -- weight drift --------------------------------------------------------------------------


def test_drift_zero_for_identical_weights_and_matches_hand_computation(modernbert_tokenizer):
    torch.manual_seed(0)
    base = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer)).state_dict()
    assert set(relative_drift(base, base).values()) == {0.0}

    changed = {k: v.clone() for k, v in base.items()}
    delta = torch.full_like(changed["model.layers.1.mlp.Wo.weight"], 0.01)
    changed["model.layers.1.mlp.Wo.weight"] += delta
    layer1 = [v for k, v in base.items() if k.startswith("model.layers.1.")]
    expected = delta.norm().item() / sum((v.double() ** 2).sum() for v in layer1).sqrt().item()

    drift = relative_drift(base, changed)
    assert drift[1] == pytest.approx(expected, rel=1e-5)  # float32 storage of W + Δ
    assert drift[-1] == drift[0] == drift[2] == 0.0
    bare = {k.removeprefix("model."): v for k, v in changed.items()}  # AutoModel keys: no wrapper prefix
    assert relative_drift(base, bare) == drift


def test_drift_of_bf16_weights_is_summed_in_float64(modernbert_tokenizer):
    """`cpt export` keeps bf16 weights as bf16, and from_pretrained loads them so: norms summed in bf16 keep
    three digits, and the drift of a small change came out percent-level wrong."""
    torch.manual_seed(0)
    base = {k: v.to(torch.bfloat16) for k, v in ModernBertForMaskedLM(tiny_config(modernbert_tokenizer)).state_dict().items()}
    noise = torch.Generator().manual_seed(7)
    other = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=noise)).to(torch.bfloat16) for k, v in base.items()}
    for layer, value in relative_drift(base, other).items():
        keys = [k for k in base if k.startswith(("model.embeddings." if layer == -1 else f"model.layers.{layer}."))]
        change = sum(((other[k].double() - base[k].double()) ** 2).sum() for k in keys)
        expected = (change / sum((base[k].double() ** 2).sum() for k in keys)).sqrt().item()
        assert value == pytest.approx(expected, rel=1e-9), layer


def test_drift_refuses_layers_with_other_parameters(modernbert_tokenizer):
    """A layer lacking a parameter (another attention variant, a pruned layer) has no comparable norm: it must be
    an error naming the architecture, not a KeyError traceback or a drift over a subset of the weights."""
    torch.manual_seed(0)
    base = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer)).state_dict()
    missing = {k: v for k, v in base.items() if k != "model.layers.1.attn.Wo.weight"}
    for one, other in ((base, missing), (missing, base)):
        with pytest.raises(UserError, match="weight drift needs one architecture"):
            relative_drift(one, other)
    shallower = {k: v for k, v in base.items() if not k.startswith("model.layers.2.")}
    with pytest.raises(UserError, match=r"models have different layers: \[-1, 0, 1, 2\] vs \[-1, 0, 1\]"):
        relative_drift(base, shallower)


def test_pipeline_drift_is_measured_from_the_base(modernbert_tokenizer):
    """drift(i) = ‖W_i − W_base,i‖ / ‖W_base,i‖: normalised by the base, in layer order −1, 0, 1, 2. A model whose
    layer 1 is doubled drifted by exactly 1 there (by 0.5 if normalised by the other model)."""
    from cpt_lightning.analysis.pipeline import drift_from_base

    torch.manual_seed(0)
    base = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer)).model
    doubled = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer)).model
    doubled.load_state_dict(base.state_dict())
    with torch.no_grad():
        for param in doubled.layers[1].parameters():
            param *= 2
    drift = drift_from_base({"base": base, "doubled": doubled})
    assert drift == {"doubled": [0.0, 0.0, pytest.approx(1.0, rel=1e-6), 0.0]}


# -- models --------------------------------------------------------------------------------


def test_probe_ids_beyond_a_models_vocabulary_or_rows_beyond_its_positions_are_refused():
    """An id equal to vocab_size is already outside the embeddings: it would be an IndexError mid-probe (or, on
    CUDA, a device-side assert) instead of an error naming the tokenizer."""
    from types import SimpleNamespace

    from cpt_lightning.analysis.models import check_probe_fits

    models = {"big": SimpleNamespace(config=SimpleNamespace(vocab_size=101, max_position_embeddings=3)),
              "small": SimpleNamespace(config=SimpleNamespace(vocab_size=100, max_position_embeddings=2))}
    check_probe_fits(models, torch.tensor([[5, 99], [0, 1]]))
    with pytest.raises(UserError, match=r"probe token id 100 is outside small's vocabulary \(100\)"):
        check_probe_fits(models, torch.tensor([[5, 100], [0, 1]]))
    with pytest.raises(UserError, match=r"probe token id 100 is outside small's vocabulary"):  # in any row
        check_probe_fits(models, torch.tensor([[5, 99], [0, 100]]))
    # rows longer than a model's positions ran on positions it never trained, without a word
    with pytest.raises(UserError, match=r"--seq-len 3 exceeds small's 2 positions: lower --seq-len"):
        check_probe_fits(models, torch.tensor([[5, 6, 7], [0, 1, 2]]))


def test_models_of_a_smaller_vocabulary_than_the_probe_are_refused(probe_file, tokenizer_dir, modernbert_tokenizer,
                                                                   tmp_path, capsys):
    """Models saved without a tokenizer pass the tokenizer check; ids of the --tokenizer beyond their embeddings
    were an IndexError traceback in the first forward pass."""
    config = tiny_config(modernbert_tokenizer)
    config.vocab_size, config.pad_token_id, config.cls_token_id, config.sep_token_id = 1000, 0, 1, 2
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    small = [str(tmp_path / name) for name in ("a", "b")]
    for folder in small:
        ModernBertForMaskedLM(config).save_pretrained(folder)
    assert main([*small, "--tokenizer", str(tokenizer_dir), "--probe", probe_file, "--out", str(tmp_path / "o"),
                 "--seq-len", "32", "--num-sequences", "2"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: probe token id ") and "outside a's vocabulary (1000)" in last


def test_every_model_that_saves_a_tokenizer_must_share_the_probes(tokenizer_dir, modernbert_tokenizer, tmp_path):
    """A folder without tokenizer files passes on the id range alone; one whose tokenizer is damaged was let through
    as if it had none (its vocabulary never compared), and one with other words is refused."""
    from cpt_lightning.analysis.models import check_same_tokenizer

    bare, damaged, other = (tmp_path / name for name in ("bare", "damaged", "other"))
    bare.mkdir()
    shutil.copytree(tokenizer_dir, damaged)
    (damaged / "tokenizer.json").write_text("{not json")
    grown = copy.deepcopy(modernbert_tokenizer)
    grown.add_tokens(["newword"])
    grown.save_pretrained(other)
    check_same_tokenizer({"base": str(tokenizer_dir), "bare": str(bare)}, modernbert_tokenizer)
    with pytest.raises(UserError, match=rf"^{damaged}: cannot load its tokenizer \(.+\); pass --tokenizer$"):
        check_same_tokenizer({"damaged": str(damaged)}, modernbert_tokenizer)
    with pytest.raises(UserError, match=rf"^other \({other}\) has another tokenizer than the probe's"):
        check_same_tokenizer({"other": str(other)}, modernbert_tokenizer)
    sharded = tmp_path / "sharded"  # a sharded checkpoint folder holds no tokenizer file: its run records one
    sharded.mkdir()
    (sharded / ".metadata").touch()
    torch.save({"hyper_parameters": {"model": None, "tokenizer": str(other)}}, sharded / "meta.pt")
    with pytest.raises(UserError, match=rf"^sharded \({sharded}\) has another tokenizer than the probe's"):
        check_same_tokenizer({"sharded": str(sharded)}, modernbert_tokenizer)


def test_models_are_compared_in_eval_mode(zoo, modernbert_tokenizer, tmp_path):
    """A model saved with dropout > 0 (a fine-tuned ModernBERT) gives other hidden states at every pass in train
    mode: CKA would measure dropout noise."""
    from cpt_lightning.analysis.models import layer_features, load_encoder
    from cpt_lightning.data.packing import position_ids_from_separators

    model = AutoModelForMaskedLM.from_pretrained(zoo["base"])
    model.config.attention_dropout = model.config.mlp_dropout = model.config.embedding_dropout = 0.5
    encoder = load_encoder(save(model, modernbert_tokenizer, tmp_path / "dropout"), torch.device("cpu"))
    ids = torch.tensor([modernbert_tokenizer("Aspirin inhibits COX-1 and COX-2.")["input_ids"]])
    positions, keep = position_ids_from_separators(ids, modernbert_tokenizer.sep_token_id), torch.ones_like(ids).bool()
    first, again = (layer_features(encoder, ids, positions, keep) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# -- seed noise ----------------------------------------------------------------------------


def test_seed_noise_pools_every_seed_pair_and_skips_single_seed_arms():
    """noise is the mean over the seed pairs of all arms together, not the mean of the arms' means: an arm with
    three seeds holds three pairs to the other's one. An arm with one seed has no seed noise (a NaN series)."""
    from cpt_lightning.analysis.seeds import seed_metrics

    arms = {"a": ["a-1", "a-2", "a-3"], "b": ["b-1", "b-2"], "c": ["c-1"]}
    within = {("a-1", "a-2"): [0.9, 0.95], ("a-1", "a-3"): [0.8, 0.95], ("a-2", "a-3"): [0.7, 0.95],
              ("b-1", "b-2"): [0.6, 0.95]}
    across = {(x, y): [0.5, 0.8] for p, q in combinations(arms, 2) for x in arms[p] for y in arms[q]}
    across["a-3", "b-2"] = [0.2, 0.8]
    metrics = seed_metrics({**within, **across}, arms)
    assert set(metrics["seed_cka"]) == {f"{x}_vs_{y}" for x, y in [*within, *across]} and len(metrics["seed_cka"]) == 15
    assert metrics["seed_noise"] == {"a": pytest.approx([0.2, 0.05]), "b": pytest.approx([0.4, 0.05])}
    # pooled noise (0.1 + 0.2 + 0.3 + 0.4) / 4 = 0.25 at layer −1, 0.05 at layer 0
    assert set(metrics["divergence"]) == set(metrics["noise_ratio"]) == {"a_vs_b", "a_vs_c", "b_vs_c"}
    assert metrics["divergence"]["a_vs_b"] == pytest.approx([(5 * 0.5 + 0.8) / 6, 0.2])  # over all six pairs
    assert metrics["noise_ratio"]["a_vs_b"] == pytest.approx([0.55 / 0.25, 4.0])
    assert metrics["noise_ratio"]["a_vs_c"] == pytest.approx([2.0, 4.0])


def test_seeds_that_share_frozen_layers_are_distinct(modernbert_tokenizer):
    """Seeds trained with LayerFreeze keep the base's embeddings, identical in every run: that is no reason to
    refuse them. Only members identical in every weight (one run given twice) are."""
    from cpt_lightning.analysis.pipeline import check_distinct_seeds

    torch.manual_seed(0)
    seeds = [ModernBertForMaskedLM(tiny_config(modernbert_tokenizer)).model for _ in range(3)]
    seeds[1].load_state_dict(seeds[0].state_dict())
    seeds[2].load_state_dict(seeds[0].state_dict())
    with torch.no_grad():
        seeds[1].layers[0].mlp.Wo.weight.add_(0.01)  # the embeddings and every other layer are shared
    models = {"x-1": seeds[0], "x-2": seeds[1], "x-3": seeds[2]}
    paths = {name: f"runs/{name}" for name in models}
    check_distinct_seeds(models, {"x": ["x-1", "x-2"]}, paths)
    with pytest.raises(UserError, match="runs/x-1 and runs/x-3 have identical weights"):
        check_distinct_seeds(models, {"x": ["x-1", "x-2", "x-3"]}, paths)
    # one run in two arms counted as zero divergence between them: a noise ratio of 0.8 for arms drawn alike
    with pytest.raises(UserError, match="--arm a and --arm b share a run: runs/x-1 and runs/x-3 have identical weights"):
        check_distinct_seeds(models, {"a": ["x-1", "x-2"], "b": ["x-3"]}, paths)
    check_distinct_seeds(models, {"a": ["x-1"], "b": ["x-2"]}, paths)


# -- probe ---------------------------------------------------------------------------------


def test_text_probe_is_packed_like_cpt_prepare_and_a_prepared_probe_without_holdout_is_its_tail(
    probe_file, tokenizer_dir, modernbert_tokenizer, tmp_path, capsys
):
    from cpt_lightning.data.prepare import prepare

    manifest, _ = prepare([probe_file], str(tmp_path / "probe"), str(tokenizer_dir), block_size=16, max_docs=20,
                          num_workers=1, holdout_tokens=0, progress=False)
    stream = load_probe(probe_file, modernbert_tokenizer, seq_len=16, num_sequences=manifest.num_blocks).rows
    assert len(stream) == manifest.num_blocks > 5
    assert stream[0, 0] == modernbert_tokenizer.cls_token_id
    assert (stream == modernbert_tokenizer.sep_token_id).sum() > 5

    capsys.readouterr()
    tail = load_probe(str(tmp_path / "probe"), modernbert_tokenizer, seq_len=16, num_sequences=3)
    assert tail.rows.dtype == torch.long and tail.held_out is False
    assert torch.equal(tail.rows, stream[-3:])
    assert capsys.readouterr().err.count("may have trained on them") == 1
    everything = load_probe(str(tmp_path / "probe"), modernbert_tokenizer, seq_len=16, num_sequences=10**6)
    assert torch.equal(everything.rows, stream)  # fewer rows than asked: all there are, each once


def test_a_prepared_probe_of_another_tokenizer_is_refused(prepared_mix, tokenizer_dir, tmp_path):
    """Prepared ids are only words under the tokenizer that wrote them: another vocabulary, or another separator
    (positions restart after it), would feed the models other text, silently."""
    from transformers import AutoTokenizer

    other = shutil.copytree(tokenizer_dir, tmp_path / "other_ids")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġof"] = vocab["Ġof"], vocab["Ġthe"]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    other_separator = AutoTokenizer.from_pretrained(tokenizer_dir, sep_token="[MASK]")
    for tokenizer in (AutoTokenizer.from_pretrained(other), other_separator):
        with pytest.raises(UserError, match="was prepared with the tokenizer .*not the models' one"):
            load_probe(str(prepared_mix.dirs["pubmed"]), tokenizer, seq_len=prepared_mix.block_size, num_sequences=2)


def test_every_probe_document_ends_with_one_separator(modernbert_tokenizer):
    """Positions restart after the separator, so each document must end with exactly one, also under a
    tokenizer that adds none itself (an EOS-only tokenizer, as `cpt prepare` handles them)."""
    from transformers import PreTrainedTokenizerFast

    from cpt_lightning.analysis.probe import tokenize
    from test_roberta_style_tokenizer import unigram_backend

    eos_only = PreTrainedTokenizerFast(tokenizer_object=unigram_backend(frame_with_specials=False), eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>")
    ids = list(tokenize(iter(["the patient", "a second document"]), eos_only))
    assert ids.count(2) == 2 and ids[-1] == 2 and ids.index(2) == len(eos_only("the patient")["input_ids"])
    ids = list(tokenize(iter(["the patient", "a second document"]), modernbert_tokenizer))
    framed = [modernbert_tokenizer(text)["input_ids"] for text in ("the patient", "a second document")]
    assert ids == framed[0] + framed[1]  # [CLS] … [SEP] each: no second separator


def test_probe_documents_end_with_sep_else_eos_as_cpt_prepare_ends_them():
    from types import SimpleNamespace

    from cpt_lightning.analysis.probe import separator_id

    assert separator_id(SimpleNamespace(sep_token_id=5, eos_token_id=7)) == 5
    assert separator_id(SimpleNamespace(sep_token_id=None, eos_token_id=7)) == 7
    with pytest.raises(UserError, match="neither a SEP nor an EOS token"):
        separator_id(SimpleNamespace(sep_token_id=None, eos_token_id=None))


def test_a_probe_file_keeps_a_lines_trailing_blanks_and_skips_blank_jsonl_lines(tmp_path):
    """As cpt prepare reads them: a .txt line's spaces are text, a blank JSONL line is no document (not a refusal)."""
    from cpt_lightning.analysis.probe import read_texts

    (tmp_path / "p.txt").write_bytes(b"tail spaces  \r\nnext\n")
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert list(read_texts(tmp_path / "p.txt")) == ["tail spaces  ", "next"]
    assert list(read_texts(tmp_path / "p.jsonl")) == ["a", "b"]


def test_a_text_probe_is_read_and_encoded_as_cpt_prepare_reads_and_encodes_it(modernbert_tokenizer, tokenizer_dir,
                                                                            tmp_path):
    """A "[SEP]" written in a text (a paper about BERT) ended the probe's document there and a "[MASK]" became the
    mask token; a .txt line kept its "\\r" as a token; a blank JSONL text was a document of its own."""
    from cpt_lightning.analysis.probe import read_texts, tokenize
    from cpt_lightning.data.prepare import prepare

    texts = ["BERT joins two sentences with [SEP] and predicts [MASK] tokens.", "  ",
             "The liver and kidney function of adults with type two diabetes.", ""] * 3
    (tmp_path / "probe.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    (tmp_path / "probe.txt").write_bytes("".join(text + "\r\n" for text in texts).encode())
    prepare([str(tmp_path / "probe.jsonl")], str(tmp_path / "prepared"), str(tokenizer_dir), block_size=8,
            num_workers=1, holdout_tokens=0, progress=False)
    prepared = load_probe(str(tmp_path / "prepared"), modernbert_tokenizer, seq_len=8, num_sequences=10**6).rows
    for suffix in ("jsonl", "txt"):
        rows = load_probe(str(tmp_path / f"probe.{suffix}"), modernbert_tokenizer, seq_len=8, num_sequences=10**6).rows
        assert torch.equal(rows, prepared), suffix
    stream = list(tokenize(read_texts(tmp_path / "probe.txt"), modernbert_tokenizer))
    assert stream.count(modernbert_tokenizer.sep_token_id) == 6  # one per document that is not blank
    assert modernbert_tokenizer.mask_token_id not in stream


def test_prepared_probe_is_its_holdout_from_the_start(probe_file, tokenizer_dir, modernbert_tokenizer, tmp_path):
    from cpt_lightning.data.prepare import prepare

    manifest, _ = prepare([probe_file], str(tmp_path / "src"), str(tokenizer_dir), block_size=16, max_docs=120,
                          num_workers=1, progress=False)
    holdout = prepared_blocks(tmp_path / "src" / "holdout", 16)
    assert manifest.holdout_documents == 2 and len(holdout) == manifest.holdout_tokens // 16 > 5
    for folder in (tmp_path / "src", tmp_path / "src" / "holdout"):
        probe = load_probe(str(folder), modernbert_tokenizer, seq_len=16, num_sequences=4)
        assert torch.equal(probe.rows, holdout[:4]) and probe.held_out is True
        assert probe.read == {str(tmp_path / "src" / "holdout"): 4}
    everything = load_probe(str(tmp_path / "src"), modernbert_tokenizer, seq_len=16, num_sequences=10**6)
    assert torch.equal(everything.rows, holdout)  # fewer rows than asked: all there are
    with pytest.raises(UserError, match="fewer than --seq-len=8192 tokens: lower --seq-len.*--holdout-tokens"):
        load_probe(str(tmp_path / "src"), modernbert_tokenizer, seq_len=8192, num_sequences=4)


@pytest.mark.parametrize("line", [json.dumps({"abstract": "Aspirin inhibits COX-1."}),
                                  '{"text": "a", "n": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["no-text-field", "number-over-4300-digits", "deep-nesting"])
def test_a_jsonl_probe_without_a_text_field_names_the_other_ways(modernbert_tokenizer, tmp_path, line):
    (tmp_path / "probe.jsonl").write_text(line + "\n")  # the last two: valid JSON Python's json will not read
    with pytest.raises(UserError, match=r"probe.jsonl:1 is not a JSON object with a 'text' field; .*a \.txt with one "
                                        r"document per line, or the folder `cpt prepare --text-field` wrote"):
        load_probe(str(tmp_path / "probe.jsonl"), modernbert_tokenizer, seq_len=16, num_sequences=4)
    (tmp_path / "probe.jsonl").write_text(json.dumps({"text": "Aspirin."}) + "\n" + json.dumps({"text": 7}) + "\n")
    with pytest.raises(UserError, match=r"probe.jsonl:2: 'text' is a int, expected a string"):  # was a traceback
        load_probe(str(tmp_path / "probe.jsonl"), modernbert_tokenizer, seq_len=16, num_sequences=4)
    for name, text in (("probe.jsonl", json.dumps({"text": ""}) + "\n"), ("probe.txt", "\n  \n"), ("empty.txt", "")):
        (tmp_path / name).write_text(text)  # it said "lower --seq-len", which cannot help
        with pytest.raises(UserError, match=f"--probe .*{name} holds no text: every document in it is empty or blank"):
            load_probe(str(tmp_path / name), modernbert_tokenizer, seq_len=16, num_sequences=4)


@pytest.mark.parametrize("suffix", ["jsonl", "txt"])
def test_a_probe_that_is_not_utf8_names_its_line(modernbert_tokenizer, tmp_path, suffix):
    """It was a UnicodeDecodeError traceback."""
    good = json.dumps({"text": "Aspirin inhibits COX-1."}).encode() if suffix == "jsonl" else b"Aspirin inhibits COX-1."
    (tmp_path / f"probe.{suffix}").write_bytes(good + b"\n" + good.replace(b"Aspirin", b"\xff\xfe") + b"\n")
    with pytest.raises(UserError, match=rf"probe\.{suffix}:2: invalid UTF-8 \(byte 0xff\)"):
        load_probe(str(tmp_path / f"probe.{suffix}"), modernbert_tokenizer, seq_len=64, num_sequences=4)


def test_an_out_that_is_a_file_is_one_line_before_any_model_loads(tmp_path, capsys):
    """A FileExistsError / NotADirectoryError traceback once the forward passes were done."""
    (tmp_path / "file").write_text("keep")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "is a file, not a folder" in err and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "keep"


def test_rows_are_split_by_largest_remainder():
    assert split_rows(7, [0.6, 0.2, 0.2]) == [4, 2, 1]  # 4.2 / 1.4 / 1.4: the tie goes to the first
    assert split_rows(10, [3, 1, 1]) == [6, 2, 2]
    assert split_rows(2, [0.6, 0.2, 0.2]) == [1, 1, 0]
    assert all(sum(split_rows(n, [0.5, 0.3, 0.2])) == n for n in range(1, 50))


def test_run_config_probe_reads_each_sources_holdout_by_weight(prepared_mix, modernbert_tokenizer, tmp_path):
    config = write_run_config(tmp_path / "config.yaml", prepared_mix.sources)
    probe = load_probe(str(config), modernbert_tokenizer, seq_len=prepared_mix.block_size, num_sequences=7)
    holdouts = [prepared_mix.dirs[name] / "holdout" for name in ("pubmed", "medical_qa", "case_reports")]
    assert probe.read == {str(h): n for h, n in zip(holdouts, [4, 2, 1])} and probe.held_out is True
    expected = torch.cat([prepared_blocks(h, prepared_mix.block_size)[:n] for h, n in zip(holdouts, [4, 2, 1])])
    assert torch.equal(probe.rows, expected)


def test_run_config_probe_names_only_the_folders_it_read_and_weighs_sources_as_cpt_fit(prepared_mix,
                                                                                       modernbert_tokenizer, tmp_path):
    """A source whose share rounds to zero rows is not listed in ``read``; a source without ``weight`` weighs 1.0,
    the default of cpt fit's Source: 6 rows at 2 : 1 : 1 split 3/2/1 (at 2 : 0.5 : 0.5 they would be 4/1/1)."""
    config = write_run_config(tmp_path / "config.yaml", prepared_mix.sources)
    probe = load_probe(str(config), modernbert_tokenizer, seq_len=prepared_mix.block_size, num_sequences=2)
    assert probe.read == {str(prepared_mix.dirs[name] / "holdout"): 1 for name in ("pubmed", "medical_qa")}
    import yaml

    loaded = yaml.safe_load(config.read_text())
    first, *others = loaded["data"]["init_args"]["sources"]
    first["weight"] = 2.0
    for source in others:
        del source["weight"]
    (tmp_path / "unweighted.yaml").write_text(yaml.safe_dump(loaded))
    probe = load_probe(str(tmp_path / "unweighted.yaml"), modernbert_tokenizer, seq_len=prepared_mix.block_size,
                       num_sequences=6)
    assert list(probe.read.values()) == [3, 2, 1]


def test_a_run_config_probe_keeps_the_mix_where_a_holdout_runs_short(prepared_mix, modernbert_tokenizer, tmp_path,
                                                                     capsys):
    """Each source read what its holdout held: the demo's default probe was 89/5/6% of a 60/20/20 mix, unsaid."""
    config = write_run_config(tmp_path / "config.yaml", prepared_mix.sources)
    holdouts = [prepared_mix.dirs[name] / "holdout" for name in ("pubmed", "medical_qa", "case_reports")]
    held = [len(prepared_blocks(h, prepared_mix.block_size)) for h in holdouts]
    asked = 5 * sum(held)
    probe = load_probe(str(config), modernbert_tokenizer, seq_len=prepared_mix.block_size, num_sequences=asked)
    shares = split_rows(asked, [0.6, 0.2, 0.2])
    kept = min(asked * got // share for got, share in zip(held, shares) if got < share)
    assert list(probe.read.values()) == [min(n, got) for n, got in zip(split_rows(kept, [0.6, 0.2, 0.2]), held)]
    assert abs(probe.read[str(holdouts[0])] / len(probe.rows) - 0.6) < 0.05, probe.read
    err = capsys.readouterr().err
    taken = ", ".join(f"{n} from {name}" for n, name in zip(probe.read.values(), ("pubmed", "medical_qa", "case_reports")))
    short = [f"{h} holds {got} rows of {prepared_mix.block_size} tokens, short of its share of {share}"
             for h, got, share in zip(holdouts, held, shares) if got < share]  # it said "gives N of its <share> rows"
    assert err == (f"note: {', '.join(short)}; the probe keeps the run's mix with {len(probe.rows)} of the {asked} "
                   f"sequences asked for ({taken}; a lower --seq-len gives more)\n")
    with pytest.raises(UserError, match=r"holds 0 rows of 100000 tokens, short of its share of \d+.*lower --seq-len"):
        load_probe(str(config), modernbert_tokenizer, seq_len=100_000, num_sequences=3)


def test_a_short_holdout_is_never_given_a_share_past_what_it_holds(prepared_mix, modernbert_tokenizer, tmp_path,
                                                                    monkeypatch, capsys):
    """The shares rounded again after a shortfall could give a short source more rows than it holds, and the probe
    took what there was: 2/7/25 rows of a 0.1 : 0.3 : 1.0 mix, where 34 rows split so are 3/7/24. Also a ``~`` in
    a source's path, which cpt fit expands and the saved config keeps as written."""
    from types import SimpleNamespace

    import cpt_lightning.analysis.probe as probe_module

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").symlink_to(prepared_mix.dirs["pubmed"].parent)
    held = {"pubmed": 3, "medical_qa": 7, "case_reports": 1000}
    monkeypatch.setattr(probe_module, "prepared_rows", lambda folder, tokenizer, seq_len, count, from_end=False:
                        torch.zeros(min(count, held[folder.parent.name]), seq_len, dtype=torch.long))
    sources = [SimpleNamespace(name=s.name, path=f"~/data/{prepared_mix.dirs[s.name].name}", weight=weight)
               for s, weight in zip(prepared_mix.sources, (0.1, 0.3, 1.0))]  # as the saved config keeps them
    probe = load_probe(str(write_run_config(tmp_path / "config.yaml", sources)), modernbert_tokenizer, seq_len=8,
                       num_sequences=40)
    taken = list(probe.read.values())
    assert taken == split_rows(sum(taken), [0.1, 0.3, 1.0]) and all(n <= h for n, h in zip(taken, held.values()))
    assert "the probe keeps the run's mix" in capsys.readouterr().err


def test_run_config_source_without_holdout_is_named(prepared_mix, probe_file, tokenizer_dir, modernbert_tokenizer,
                                                     tmp_path):
    from cpt_lightning.data import Source
    from cpt_lightning.data.prepare import prepare

    prepare([probe_file], str(tmp_path / "notes"), str(tokenizer_dir), block_size=16, max_docs=20, num_workers=1,
            holdout_tokens=0, progress=False)
    sources = [*prepared_mix.sources, Source("notes", str(tmp_path / "notes"), 0.5)]
    config = write_run_config(tmp_path / "config.yaml", sources)
    with pytest.raises(UserError, match=r"source 'notes' .*no holdout/; prepare it again with cpt prepare --holdout-tokens"):
        load_probe(str(config), modernbert_tokenizer, seq_len=16, num_sequences=4)
    (tmp_path / "bare.yaml").write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(UserError, match="no data.init_args.sources list"):
        load_probe(str(tmp_path / "bare.yaml"), modernbert_tokenizer, seq_len=16, num_sequences=4)


def test_default_probe_is_the_holdout_of_a_checkpoints_run(zoo, prepared_mix, tmp_path, capsys):
    config = write_run_config(tmp_path / "run" / "config.yaml", prepared_mix.sources)
    ckpt = write_checkpoint(zoo["detour1"], tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert run_main(f"base={zoo['base']}", f"ckpt={ckpt}", "--out", tmp_path / "out", "--seq-len", 32,
                    "--num-sequences", 5) == 0
    assert f"probe: the holdouts of the training sources in {config}" in capsys.readouterr().err
    probe = json.loads((tmp_path / "out" / "layers.json").read_text())["probe"]
    assert (probe["path"], probe["given"], probe["held_out"], probe["sequences"]) == (str(config), False, True, 5)
    assert list(probe["read"].values()) == [3, 1, 1]
    assert all(folder.endswith("/holdout") for folder in probe["read"])


def test_default_probe_is_the_config_a_checkpoint_holds(zoo, prepared_mix, tmp_path, capsys):
    """The log folder's config.yaml is the latest resume's (here: another mix), and a checkpoint moved or set aside
    has none beside it: the probe comes from the config the checkpoint was trained under, which it holds."""
    import yaml

    trained_under = write_run_config(tmp_path / "trained_under.yaml", prepared_mix.sources[:1])
    write_run_config(tmp_path / "run" / "config.yaml", prepared_mix.sources[1:])  # a later resume's
    ckpt = write_checkpoint(zoo["detour1"], tmp_path / "run" / "checkpoints" / "step1.ckpt")
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["run_config"] = trained_under.read_text()
    torch.save(checkpoint, ckpt)
    moved = shutil.copy(ckpt, tmp_path / "elsewhere.ckpt")
    for path in (ckpt, moved):
        assert run_main(f"base={zoo['base']}", f"ckpt={path}", "--out", tmp_path / "out", "--seq-len", 32,
                        "--num-sequences", 3) == 0
        assert f"probe: the holdouts of the training sources in {path} (the run config it holds)" in capsys.readouterr().err
        probe = json.loads((tmp_path / "out" / "layers.json").read_text())["probe"]
        assert probe["read"] == {str(prepared_mix.dirs["pubmed"] / "holdout"): 3}, probe
    checkpoint["run_config"] = yaml.safe_dump({"trainer": {"max_steps": 10}})
    torch.save(checkpoint, moved)
    assert run_main(f"base={zoo['base']}", f"ckpt={moved}", "--out", tmp_path / "out") == 2
    assert "error: probe " + str(moved) + " (the run config it holds): no data.init_args.sources" in capsys.readouterr().err


def test_default_probe_from_an_exported_folders_training_config(zoo, prepared_mix, tmp_path):
    import shutil

    exported = shutil.copytree(zoo["detour1"], tmp_path / "exported")
    config = write_run_config(exported / "training_config.yaml", prepared_mix.sources[:1])
    assert run_main(f"base={zoo['base']}", f"exp={exported}", "--out", tmp_path / "out", "--seq-len", 32,
                    "--num-sequences", 3) == 0
    probe = json.loads((tmp_path / "out" / "layers.json").read_text())["probe"]
    assert probe["path"] == str(config) and probe["read"] == {str(prepared_mix.dirs["pubmed"] / "holdout"): 3}


def test_default_probe_is_the_first_models_run_config(tmp_path):
    """The base comes first: with several exported models, the probe is the run config of the first one that has
    one (an HF base from the hub has none), as printed, not whichever model happens to be last."""
    from cpt_lightning.analysis.probe import default_probe

    folders = [tmp_path / name for name in ("hub_base", "detour", "mlm")]
    for folder in folders:
        folder.mkdir()
    for folder in folders[1:]:
        (folder / "training_config.yaml").write_text(f"run: {folder.name}\n")
    path, config = default_probe([str(folder) for folder in folders])
    assert path == str(folders[1] / "training_config.yaml") and config.text == "run: detour\n"


# -- plot ----------------------------------------------------------------------------------


def test_plot_has_one_line_per_series_and_is_a_png(tmp_path):
    layers = [-1, 0, 1, 2]
    metrics = {
        "cka": {f"{a}_vs_{b}": [1.0, 0.9, 0.8, 0.7] for a, b in combinations("abc", 2)},
        "drift": {"b": [0.1] * 4, "c": [0.2] * 4},
        "noise_ratio": {"x_vs_y": [1.0, 5.0, 2.0, 1.5]},
    }
    result = LayerMetrics(layers=layers, metrics=metrics)
    figure = make_figure(result)
    assert [len(ax.lines) for ax in figure.axes] == [3, 2, 1]
    assert [ax.get_yscale() for ax in figure.axes] == ["linear", "linear", "log"]  # ratios span 1× to 100×
    assert [ax.get_ylabel() for ax in figure.axes] == ["linear CKA", "‖W − W_base‖ / ‖W_base‖", "divergence / seed noise"]
    assert [t.get_text() for t in figure.axes[1].get_legend().get_texts()] == ["b", "c"]
    assert [ax.get_xlabel() for ax in figure.axes] == ["", "", "layer"]  # under the lowest panel only
    save_plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(tmp_path / "plot.png").ndim == 3


def test_a_metric_without_series_gets_no_panel():
    """One model and an --arm: no CKA between positional models, so no empty CKA panel above the drift."""
    figure = make_figure(LayerMetrics(layers=[-1, 0], metrics={"cka": {}, "drift": {"b": [0.1, 0.2]}}))
    assert [ax.get_ylabel() for ax in figure.axes] == ["‖W − W_base‖ / ‖W_base‖"]


def test_undefined_numbers_are_null_in_layers_json(tmp_path):
    """A noise ratio where all seed pairs agree exactly is 0/0 or x/0; JSON has no NaN or Infinity, and
    json.dumps would write them anyway (files other readers reject), so they are written as null."""
    from cpt_lightning.analysis.report import write_json

    metrics = {"noise_ratio": {"a_vs_b": [float("nan"), float("inf"), 2.5]}}
    write_json(LayerMetrics(layers=[-1, 0, 1], metrics=metrics), tmp_path / "layers.json")
    text = (tmp_path / "layers.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["metrics"]["noise_ratio"]["a_vs_b"] == [None, None, 2.5]


# -- end to end ----------------------------------------------------------------------------


def test_model_with_itself_has_cka_one_and_zero_drift(zoo, probe_file, tmp_path):
    code = run_main(f"a={zoo['base']}", f"b={zoo['base']}", "--probe", probe_file, "--out", tmp_path,
                    "--seq-len", 32, "--num-sequences", 6, "--batch-size", 4)
    assert code == 0
    metrics = json.loads((tmp_path / "layers.json").read_text())["metrics"]
    assert metrics["cka"]["a_vs_b"] == pytest.approx([1.0] * 4, abs=1e-9)
    assert metrics["drift"]["b"] == [0.0] * 4


def test_a_model_written_over_while_it_is_analyzed_is_refused_and_the_figures_name_the_weights_read(
        zoo, probe_file, tmp_path, monkeypatch, capsys):
    """An export replaced during cpt analyze gave the old weights' figures under the path that now holds others,
    exit 0, with nothing to tell them apart."""
    import shutil

    from cpt_lightning.analysis import pipeline
    from cpt_lightning.weights_digest import weights_digest

    model = shutil.copytree(zoo["detour1"], tmp_path / "export")
    args = (f"base={zoo['base']}", f"detour={model}", "--probe", probe_file, "--seq-len", 32, "--num-sequences", 6,
            "--batch-size", 4)
    assert run_main(*args, "--out", tmp_path / "kept") == 0
    digests = json.loads((tmp_path / "kept" / "layers.json").read_text())["weights_digests"]
    assert digests == {"base": weights_digest(zoo["base"]), "detour": weights_digest(model)}
    analyze = pipeline.analyze

    def replaced_meanwhile(*args, **kwargs):
        result = analyze(*args, **kwargs)
        shutil.copy(Path(zoo["detour2"]) / "model.safetensors", model / "model.safetensors")
        return result

    monkeypatch.setattr(pipeline, "analyze", replaced_meanwhile)
    assert run_main(*args, "--out", tmp_path / "refused") == 2
    assert f"detour={model}: its weights changed while it was analyzed" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "layers.json").exists()


def test_a_checkpoints_digest_follows_its_files_and_a_damaged_weights_file_has_none(zoo, tmp_path):
    """A last.ckpt its fit saves again is what is most often written over while analyzed: its files are digested
    (weights_digest reads safetensors folders only). A weights file cut short is left to the loader's own line (the
    digest's struct error was a traceback)."""
    import shutil

    from cpt_lightning.analysis.cli import content_digest

    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"PK" + b"x" * 100)
    before = content_digest(str(checkpoint))
    checkpoint.write_bytes(b"PK" + b"y" * 100)
    assert None is not before != content_digest(str(checkpoint))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"m")
    (sharded / "__0_0.distcp").write_bytes(b"a")
    before = content_digest(str(sharded))
    (sharded / "__0_0.distcp").write_bytes(b"b")
    assert None is not before != content_digest(str(sharded))
    cut = shutil.copytree(zoo["base"], tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:5])
    assert content_digest(str(cut)) is None


def test_cka_is_over_each_documents_own_bidirectional_states_without_special_tokens(zoo, modernbert_tokenizer,
                                                                                     sample_texts):
    """Against plain transformers, one document at a time: packed documents attend only within themselves,
    in both directions, and [CLS]/[SEP] (the same token everywhere, which inflates CKA) are left out."""
    from cpt_lightning.analysis.pipeline import stream_cka

    models = {name: AutoModelForMaskedLM.from_pretrained(zoo[name]).eval() for name in ("base", "detour1")}
    lengths = [(40, 24), (30, 34)]  # two rows of 64 tokens, two whole documents each
    docs = [modernbert_tokenizer(text, truncation=True, max_length=n, return_tensors="pt")["input_ids"][0]
            for text, n in zip(sample_texts, [n for row in lengths for n in row])]
    rows = torch.stack([torch.cat(docs[0:2]), torch.cat(docs[2:4])])
    cka, tokens = stream_cka(models, rows, [("base", "detour1")], modernbert_tokenizer, 1, torch.device("cpu"))

    def states(model):  # per layer: every document's hidden states alone, [CLS] and [SEP] dropped
        with torch.no_grad():
            per_doc = [model(input_ids=doc[None], output_hidden_states=True).hidden_states for doc in docs]
        return [torch.cat([hidden[layer][0, 1:-1] for hidden in per_doc]) for layer in range(4)]

    expected = [reference_cka(a, b) for a, b in zip(states(models["base"]), states(models["detour1"]))]
    assert tokens == 128 - 8 and cka[("base", "detour1")] == pytest.approx(expected, abs=1e-5)


def test_a_batch_of_special_tokens_only_is_skipped_and_a_probe_of_them_is_refused(zoo, modernbert_tokenizer):
    """Its features are empty: taken as the first batch, their mean (the shift every later batch is summed around)
    would be NaN, and so every layer's CKA. A probe of nothing else is one line, not a KeyError."""
    from cpt_lightning.analysis.pipeline import stream_cka

    models = {name: AutoModelForMaskedLM.from_pretrained(zoo[name]).eval() for name in ("base", "detour1")}
    tok, pair, cpu = modernbert_tokenizer, ("base", "detour1"), torch.device("cpu")
    special = torch.tensor([[tok.cls_token_id, tok.sep_token_id] * 16])
    text = torch.randint(1000, 2000, (2, 32), generator=torch.Generator().manual_seed(0))
    alone, tokens = stream_cka(models, text, [pair], tok, 1, cpu)
    after_special, tokens_after_special = stream_cka(models, torch.cat([special, text]), [pair], tok, 1, cpu)
    assert tokens == tokens_after_special == 64 and after_special[pair] == pytest.approx(alone[pair], abs=1e-9)
    with pytest.raises(UserError, match="the probe rows hold only special tokens; nothing to compare"):
        stream_cka(models, special, [pair], tok, 1, cpu)


def test_checkpoint_is_read_as_the_model_it_holds(zoo, probe_file, tmp_path):
    """A cpt fit checkpoint (weights under ``model.``, architecture in hyper_parameters) equals its HF folder."""
    write_checkpoint(zoo["detour1"], tmp_path / "last.ckpt")
    code = run_main(f"base={zoo['base']}", f"folder={zoo['detour1']}", f"ckpt={tmp_path / 'last.ckpt'}",
                    "--probe", probe_file, "--out", tmp_path / "out", "--seq-len", 32, "--num-sequences", 4)
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "layers.json").read_text())["metrics"]
    assert metrics["cka"]["folder_vs_ckpt"] == pytest.approx([1.0] * 4, abs=1e-9)
    assert metrics["drift"]["ckpt"] == metrics["drift"]["folder"] != [0.0] * 4


def test_models_stored_in_bf16_are_compared_in_fp32(zoo, modernbert_tokenizer, tmp_path):
    """A bf16 folder ran its forward pass in bf16, and a bf16 checkpoint also with bf16-rounded rotary frequencies:
    weights equal to an fp32 copy's (drift 0) gave CKA below 1 by up to 1e-4, as large as seed noise."""
    from cpt_lightning.analysis.models import layer_features, load_encoder

    bf16 = AutoModelForMaskedLM.from_pretrained(zoo["detour1"]).to(torch.bfloat16)
    folders = {"bf16": save(bf16, modernbert_tokenizer, tmp_path / "bf16"),
               "fp32": save(bf16.float(), modernbert_tokenizer, tmp_path / "fp32")}
    assert AutoModelForMaskedLM.from_pretrained(folders["bf16"]).dtype == torch.bfloat16  # as stored
    ckpt = write_checkpoint(folders["bf16"], tmp_path / "last.ckpt")
    assert torch.load(ckpt, weights_only=False)["state_dict"]["model.model.embeddings.tok_embeddings.weight"].dtype \
        == torch.bfloat16
    ids = torch.tensor([modernbert_tokenizer("Aspirin inhibits platelet aggregation in patients. " * 8)["input_ids"]])
    positions, keep = torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool)
    features = {}
    for name, path in {**folders, "ckpt": ckpt}.items():
        encoder = load_encoder(str(path), torch.device("cpu"))
        assert encoder.dtype == torch.float32
        assert all(buffer.dtype == torch.float32 for key, buffer in encoder.named_buffers() if "inv_freq" in key)
        features[name] = layer_features(encoder, ids, positions, keep)
    for name in ("bf16", "ckpt"):
        assert all(torch.equal(a, b) for a, b in zip(features[name], features["fp32"])), name


def saved_without_head(folder, directory) -> str:
    """An HF folder saved as ModernBertModel (``AutoModel``'s class): the encoder without the MLM head."""
    from transformers import AutoTokenizer, ModernBertModel

    ModernBertForMaskedLM.from_pretrained(folder).model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(folder).save_pretrained(directory)
    assert ModernBertModel.from_pretrained(directory) is not None
    return str(directory)


def test_a_folder_saved_without_its_head_is_compared_as_its_encoder(zoo, probe_file, tmp_path, caplog, monkeypatch):
    """Its layers are the same model's; the head it lacks is not reported as 'newly initialized' noise."""
    bare = saved_without_head(zoo["detour1"], tmp_path / "bare")
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # to caplog's handler
    with caplog.at_level(logging.WARNING, logger="transformers"):
        code = run_main(f"base={zoo['base']}", f"folder={zoo['detour1']}", f"bare={bare}",
                        "--probe", probe_file, "--out", tmp_path / "out", "--seq-len", 32, "--num-sequences", 4)
    assert code == 0 and not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    metrics = json.loads((tmp_path / "out" / "layers.json").read_text())["metrics"]
    assert metrics["cka"]["folder_vs_bare"] == pytest.approx([1.0] * 4, abs=1e-9)


def test_a_folder_missing_encoder_weights_is_refused(zoo, probe_file, tmp_path, capsys):
    """transformers initialised the missing layer at random and the analysis compared it, with a warning only."""
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(zoo["detour1"], tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")}, broken / "model.safetensors",
              metadata={"format": "pt"})
    assert run_main(f"base={zoo['base']}", f"broken={broken}", "--probe", probe_file, "--out", tmp_path / "out") == 2
    assert re.search(r"weights are missing from its files \(e\.g\. 'model\.layers\.1\..*'\): its layers would be random",
                     capsys.readouterr().err)


def test_a_transplant_into_a_folder_without_its_head_is_refused(zoo, tmp_path, capsys):
    """The transplant got a random MLM head, silently: fill-mask from it was noise."""
    bare = saved_without_head(zoo["baseline3"], tmp_path / "bare_target")
    assert run_main(zoo["detour1"], bare, "--transplant", "0-1", "--out", tmp_path / "out") == 2
    assert "has no MLM head); give TARGET as `cpt export` writes it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    source = saved_without_head(zoo["detour1"], tmp_path / "bare_source")  # the layers are all a source gives
    for name in ("tokenizer.json", "tokenizer_config.json"):  # nor its tokenizer: the transplant ships B's
        (tmp_path / "bare_source" / name).unlink()
    assert run_main(source, zoo["baseline3"], "--transplant", "0-1", "--out", tmp_path / "out") == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    result, detour = (AutoModelForMaskedLM.from_pretrained(p).state_dict() for p in (tmp_path / "out", zoo["detour1"]))
    assert all(torch.equal(result[k], detour[k]) for k in result if k.startswith(("model.layers.0.", "model.layers.1.")))


def test_end_to_end_writes_png_csv_json_tensorboard(zoo, probe_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code = run_main(
        f"base={zoo['base']}", f"d1={zoo['detour1']}", f"b1={zoo['baseline3']}",
        "--arm", f"detour={zoo['detour1']},{zoo['detour2']}",
        "--arm", f"baseline={zoo['baseline3']},{zoo['baseline4']}",
        "--probe", probe_file, "--out", tmp_path, "--seq-len", 32, "--num-sequences", 12, "--batch-size", 4,
    )
    assert code == 0
    report = json.loads((tmp_path / "layers.json").read_text())
    assert report["layers"] == [-1, 0, 1, 2]
    assert report["base"] == "base" and report["models"]["d1"] == zoo["detour1"]
    assert report["arms"] == {"detour": ["detour-1", "detour-2"], "baseline": ["baseline-1", "baseline-2"]}
    assert {k: report["probe"][k] for k in ("path", "given", "sequences", "seq_len")} == {
        "path": probe_file, "given": True, "sequences": 12, "seq_len": 32}
    metrics = report["metrics"]
    assert sorted(metrics["cka"]) == ["base_vs_b1", "base_vs_d1", "d1_vs_b1"]
    assert sorted(metrics["drift"]) == ["b1", "baseline-1", "baseline-2", "d1", "detour-1", "detour-2"]
    # the detour rewrote layer 0 only: the pipeline must find it there
    assert metrics["drift"]["d1"][1] > 10 * metrics["drift"]["d1"][2]
    assert metrics["cka"]["base_vs_d1"][1] < metrics["cka"]["base_vs_b1"][1]
    assert metrics["noise_ratio"]["detour_vs_baseline"][1] > 3
    assert metrics["noise_ratio"]["detour_vs_baseline"][0] == pytest.approx(1.0, abs=0.5)  # embeddings: seed-level

    csv_lines = (tmp_path / "layers.csv").read_text().splitlines()
    assert csv_lines[0] == "metric,series,layer,value"
    series = sum(len(group) for group in metrics.values())
    assert len(csv_lines) == 1 + 4 * series

    assert (tmp_path / "layers.png").read_bytes()[:8] == PNG_MAGIC
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("cka/base_vs_d1")
    assert [e.step for e in scalars] == [-1, 0, 1, 2]
    assert [e.value for e in scalars] == pytest.approx(metrics["cka"]["base_vs_d1"], abs=1e-6)
    assert "noise_ratio/detour_vs_baseline" in events.Tags()["scalars"]


# -- transplant ----------------------------------------------------------------------------


def test_transplant_takes_the_layers_from_a_and_the_rest_from_b(zoo, tmp_path):
    out = tmp_path / "transplanted"
    out.mkdir()  # new or empty: an empty folder is written into
    assert run_main(zoo["detour1"], zoo["baseline3"], "--transplant", "0-1", "--out", out) == 0
    result = AutoModelForMaskedLM.from_pretrained(out).state_dict()
    source = AutoModelForMaskedLM.from_pretrained(zoo["detour1"]).state_dict()
    target = AutoModelForMaskedLM.from_pretrained(zoo["baseline3"]).state_dict()
    from_source = [k for k in result if k.startswith(("model.layers.0.", "model.layers.1."))]
    assert from_source and all(torch.equal(result[k], source[k]) for k in from_source)
    rest = [k for k in result if k not in from_source]
    assert any(k.startswith("model.layers.2.") for k in rest)
    assert any(k.startswith("model.embeddings.") for k in rest)
    assert all(torch.equal(result[k], target[k]) for k in rest)
    assert not all(torch.equal(source[k], target[k]) for k in from_source), "A and B must differ"
    assert (out / "tokenizer.json").is_file()
    assert "global_rope_theta" in json.loads((out / "config.json").read_text())  # loads in transformers 4.x too
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    provenance = json.loads((out / "transplant.json").read_text())
    assert provenance == {"layers_from": zoo["detour1"], "layers": [0, 1], "rest_from": zoo["baseline3"]}


def test_a_transplant_between_models_of_other_tokenizers_is_refused(zoo, modernbert_tokenizer, tmp_path, capsys):
    """Layers trained on the embeddings of other words were put into the target and written as a model."""
    source = tmp_path / "other_words"
    shutil.copytree(zoo["detour1"], source)
    grown = copy.deepcopy(modernbert_tokenizer)
    grown.add_tokens(["newword"])
    grown.save_pretrained(source)
    assert run_main(source, zoo["baseline3"], "--transplant", "0-1", "--out", tmp_path / "out") == 2
    assert (f"error: SOURCE ({source}) has another tokenizer than TARGET ({zoo['baseline3']}): its layers were "
            "trained on the embeddings of other words; transplant between models that share one tokenizer"
            ) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (source / "tokenizer.json").write_text("{not json")  # one that does not load: the layers are all SOURCE gives
    assert run_main(source, zoo["baseline3"], "--transplant", "0-1", "--out", tmp_path / "out") == 0


def test_transplant_reaches_the_last_layer_and_refuses_other_shapes(modernbert_tokenizer):
    """I-J is inclusive: J = L−1 (the last layer) is valid, J = L is not. Layers of another width are refused
    before load_state_dict, whose size-mismatch traceback would be the only message."""
    from cpt_lightning.analysis.transplant import check_compatible

    config = tiny_config(modernbert_tokenizer)
    source, target = ModernBertForMaskedLM(config), ModernBertForMaskedLM(config)
    check_compatible(source, target, range(0, 3))
    check_compatible(source, target, range(2, 3))
    with pytest.raises(UserError, match="--transplant 1-3 is outside layers 0-2 of TARGET"):
        check_compatible(source, target, range(1, 4))
    with pytest.raises(UserError, match="--transplant -1-1 is outside layers 0-2 of TARGET"):
        check_compatible(source, target, range(-1, 2))  # -1 is where layer_of puts the embeddings
    deeper = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer, num_hidden_layers=4))
    with pytest.raises(UserError, match="--transplant 1-3 is outside layers 0-2 of SOURCE"):
        check_compatible(source, deeper, range(1, 4))
    config.intermediate_size = 96
    with pytest.raises(UserError, match="differ in parameter names or shapes"):
        check_compatible(ModernBertForMaskedLM(config), target, range(1, 2))


@pytest.mark.parametrize("change, refusal", [
    ({"global_attn_every_n_layers": 1}, "layer 1's attention is 'full_attention' in SOURCE but 'sliding_attention'"),
    ({"local_attention": 32}, "layer 1's window is 32 in SOURCE but 128 in TARGET"),
    ({"global_rope_theta": 10_000.0}, "layer 0's rope is {'rope_type': 'default', 'rope_theta': 10000.0} in SOURCE"),
    ({"num_attention_heads": 4}, "layer 0's num_attention_heads is 4 in SOURCE but 2 in TARGET"),
    ({"hidden_activation": "silu"}, "layer 0's hidden_activation is 'silu' in SOURCE but 'gelu' in TARGET"),
    ({"norm_eps": 1e-3}, "layer 0's norm_eps is 0.001 in SOURCE but 1e-05 in TARGET"),
])
def test_a_transplant_of_same_shaped_layers_under_other_settings_is_refused(modernbert_tokenizer, change, refusal):
    """These load without a size mismatch: the transplant wrote a model whose layers computed something else than
    they were trained to (a sliding-window layer of A as a global one of B, another RoPE base) and scored it."""
    from cpt_lightning.analysis.transplant import check_compatible

    target = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer))
    source = ModernBertForMaskedLM(tiny_config(modernbert_tokenizer, **change))
    with pytest.raises(UserError, match=re.escape(refusal)):
        check_compatible(source, target, range(0, 2))
    check_compatible(target, ModernBertForMaskedLM(tiny_config(modernbert_tokenizer)), range(0, 2))


def test_pairs_base_compares_the_base_with_each_other_model():
    """--pairs base: n − 1 pairs, base first (the series are named base_vs_X), instead of every two models."""
    from cpt_lightning.analysis.cli import comparison_pairs

    assert comparison_pairs(["base", "a", "b"], "base") == [("base", "a"), ("base", "b")]
    assert comparison_pairs(["base", "a", "b"], "all") == [("base", "a"), ("base", "b"), ("a", "b")]


def test_models_are_named_after_their_folder_and_arms_skip_blank_members(tmp_path, monkeypatch):
    """A path holding an '=' is a path, not NAME=PATH; the series of a folder is its name, not the whole path."""
    from types import SimpleNamespace

    from cpt_lightning.analysis.cli import collect_models, parse_arm, parse_model

    assert parse_model("runs/detour/phase1-mlm") == ("phase1-mlm", "runs/detour/phase1-mlm")
    assert parse_model("data/lr=1e-4/model") == ("model", "data/lr=1e-4/model")
    assert parse_model("lr=1e-3") == ("lr", "1e-3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=1e-3").mkdir()  # a folder of the current one, as Hydra names runs
    assert parse_model("lr=1e-3") == ("lr=1e-3", "lr=1e-3")
    assert parse_arm("x=a,,b,") == ("x", ["a", "b"])
    with pytest.raises(UserError, match="--arm x is given twice"):
        collect_models(SimpleNamespace(models=["base"], arm=["x=a,b", "x=c,d"]))
    # (a_vs_b, c) and (a, b_vs_c) were both the series a_vs_b_vs_c: one pair's CKA was lost without a word
    for models, arms, joined in [(["a_vs_b=m1", "c=m2", "a=m3", "b_vs_c=m4"], [], "a_vs_b"),
                                 (["base", "runs/clm_vs_mlm"], [], "clm_vs_mlm"), (["base"], ["x_vs_y=s1,s2"], "x_vs_y-1")]:
        with pytest.raises(UserError, match=rf"^model name '{joined}' holds '_vs_', which joins two names in a pair's "
                                            r"series \(A_vs_B\): name it NAME=PATH without it$"):
            collect_models(SimpleNamespace(models=models, arm=arms))
    assert list(collect_models(SimpleNamespace(models=["a_v_b=m1", "vs=m2"], arm=[]))[0]) == ["a_v_b", "vs"]


def test_every_default_the_help_states_is_the_one_used():
    from cpt_lightning.analysis.cli import build_parser

    stated = {action.dest: re.search(r"\(default (\w+)", action.help or "") for action in build_parser()._actions}
    stated = {dest: found[1] for dest, found in stated.items() if found}
    assert set(stated) >= {"num_sequences", "seq_len", "batch_size", "pairs", "device"}
    defaults = vars(build_parser().parse_args(["a", "b", "--out", "o"]))
    assert {dest: str(defaults[dest]) for dest in stated} == stated


def test_a_transplant_checks_both_models_first_names_its_layers_and_takes_no_arm(monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    from cpt_lightning.analysis import cli, transplant
    from cpt_lightning.analysis.cli import parse_layer_range

    assert parse_layer_range("3") == parse_layer_range("3-3") == range(3, 4)  # I alone: that one layer
    checked, done = [], []
    monkeypatch.setattr(cli, "require_model", checked.append)
    monkeypatch.setattr(transplant, "transplant", lambda *args: done.append(args[2]))
    argv = ["a", "b", "--transplant", "0-7", "--out", str(tmp_path / "o")]
    args = cli.build_parser().parse_args(argv)
    cli.run_transplant(args)
    assert checked == ["a", "b"] and done == [range(0, 8)]
    assert "layers 0-7 from a, the rest from b" in capsys.readouterr().out
    with pytest.raises(UserError, match="exactly two models"):
        cli.run_transplant(SimpleNamespace(**{**vars(args), "arm": ["x=c,d"]}))
    with pytest.raises(UserError, match=r"^--probe, --seq-len: the analysis's, which --transplant does not run \(it "
                                        r"ignored them\); leave them out, or analyze the transplanted model afterwards$"):
        cli.run_transplant(cli.build_parser().parse_args([*argv, "--seq-len", "64", "--probe", "p.jsonl"]))
    assert done == [range(0, 8)]


def test_the_tokenizer_is_the_bases_and_the_probe_record_counts_the_rows_read(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from cpt_lightning.analysis import cli, pipeline, probe, report

    asked, written = [], []
    monkeypatch.setattr(cli, "require_model", lambda path: None)
    monkeypatch.setattr(cli, "load_model_tokenizer", lambda path: asked.append(path) or "tokenizer")
    monkeypatch.setattr(cli, "check_same_tokenizer", lambda paths, tokenizer: None)
    monkeypatch.setattr(probe, "load_probe", lambda *args: SimpleNamespace(rows=torch.zeros(3, 4), held_out=True, read={}))
    monkeypatch.setattr(pipeline, "analyze", lambda *args: LayerMetrics(layers=[-1], meta={}))
    monkeypatch.setattr(report, "write_all", lambda result, out: written.append(result))
    cli.run_analysis(cli.build_parser().parse_args(["base=B", "other=O", "--probe", "p.jsonl", "--out", str(tmp_path),
                                                    "--device", "cpu", "--num-sequences", "100", "--seq-len", "4"]))
    assert asked == ["B"]
    assert written[0].meta["probe"]["sequences"] == 3  # a short probe: the rows it held, not the 100 asked for


# -- user errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a={base}", "b={base}", "--probe", "missing.jsonl"], "does not exist"),
        (["{base}", "{base}", "--transplant", "2-1"], "--transplant"),
        (["{base}", "{base}", "--transplant", "1-"], "--transplant '1-': expected I-J"),  # was 1-1, without a word
        (["{base}", "{base}", "--transplant", ""], "--transplant '': expected I-J"),  # was a full analysis into --out
        (["{base}", "{base}", "--transplant", "0-5"], "outside layers 0-2"),
        (["{base}", "--arm", "x={base}", "--probe", "p.jsonl"], "two or more seeds"),
        (["{base}", "{base}", "--probe", "p.jsonl"], "unique"),
        (["{base}", "./nowhere", "--probe", "{probe}"], "./nowhere: no such folder or checkpoint"),
        (["{base}", "{empty_dir}", "--probe", "{probe}"], "neither a Hugging Face model folder"),
        (["a=", "b={base}", "--probe", "{probe}"], "'a=': expected NAME=PATH, a path after the '='"),
        (["a={base}", "b={base}", "--probe", "{probe}", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
        (["a={base}", "b={base}", "--probe", "{probe}", "--tokenizer", "{empty_dir}"], "cannot load a tokenizer"),
        (["{base}", "--arm", "x={base},{base}", "--probe", "{probe}", "--seq-len", "32"], "have identical weights"),
        (["a={base}", "b={base}", "--probe", "{probe}"], "--seq-len 512 exceeds a's 128 positions"),
        (["{base}", "--num-sequences", "0"], "positive integer"),
        (["a={base}", "b={base}", "--probe", "{empty_dir}"], "not a prepared source"),
        (["a={base}", "b={base}"], NO_PROBE),
        (["{base}", "--probe", "{probe}"], "give at least two models"),
    ],
)
def test_user_errors_are_one_line(zoo, probe_file, tmp_path, capsys, argv, message):
    argv = [a.format(base=zoo["base"], probe=probe_file, empty_dir=tmp_path) for a in argv]
    argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err  # transformers may draw its own loading bars above the error
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err


def test_a_hub_name_is_accepted_and_another_architecture_is_refused(zoo, modernbert_tokenizer, tmp_path, monkeypatch):
    """The documented base, answerdotai/ModernBERT-base, was refused as "neither a folder nor a checkpoint"."""
    from transformers import AutoConfig, BertConfig, BertForMaskedLM

    from cpt_lightning.analysis.models import require_model

    asked = []
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda name, **kw: asked.append(name) or tiny_config(modernbert_tokenizer))
    require_model("answerdotai/ModernBERT-base")
    assert asked == ["answerdotai/ModernBERT-base"]
    monkeypatch.undo()
    bert = BertForMaskedLM(BertConfig(vocab_size=len(modernbert_tokenizer), hidden_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UserError, match="is a 'bert' model; cpt analyze compares ModernBERT encoders"):
        require_model(save(bert, modernbert_tokenizer, tmp_path / "bert"))  # was an AttributeError traceback
    (tmp_path / "roberta").mkdir()
    (tmp_path / "roberta" / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(UserError, match="is a 'roberta' model; cpt analyze compares ModernBERT"):
        require_model(str(tmp_path / "roberta"))
    (tmp_path / "unknown").mkdir()  # a model_type this transformers does not know: ValueError, not OSError
    (tmp_path / "unknown" / "config.json").write_text('{"model_type": "no_such_arch"}')
    with pytest.raises(UserError, match="not a model folder, checkpoint or name from_pretrained can load"):
        require_model(str(tmp_path / "unknown"))


def test_models_of_other_depths_are_refused():
    from types import SimpleNamespace

    from cpt_lightning.analysis.models import check_same_depth

    models = {name: SimpleNamespace(config=SimpleNamespace(num_hidden_layers=depth)) for name, depth in (("a", 3), ("b", 4))}
    with pytest.raises(UserError, match=r"models have different numbers of layers: \{'a': 3, 'b': 4\}"):
        check_same_depth(models)


def test_a_model_of_another_width_is_refused_before_the_probe_runs(zoo, probe_file, modernbert_tokenizer, tmp_path,
                                                                   monkeypatch, capsys):
    from cpt_lightning.analysis import pipeline

    config = tiny_config(modernbert_tokenizer)
    config.hidden_size, config.intermediate_size = 64, 128
    wide = save(ModernBertForMaskedLM(config), modernbert_tokenizer, tmp_path / "wide")
    monkeypatch.setattr(pipeline, "stream_cka", lambda *a: pytest.fail("the probe ran before the architecture check"))
    assert main([f"base={zoo['base']}", f"wide={wide}", "--probe", probe_file, "--seq-len", "32",
                 "--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: wide against the base base: ") and "weight drift needs one architecture" in last


def test_a_rerun_into_the_same_out_keeps_only_its_own_tensorboard_series(zoo, probe_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--probe", probe_file, "--out", tmp_path, "--seq-len", 32, "--num-sequences", 4]
    assert run_main(f"base={zoo['base']}", f"a={zoo['detour1']}", *common) == 0
    assert run_main(f"base={zoo['base']}", f"b={zoo['baseline3']}", *common) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["cka/base_vs_b", "drift/b"]


def test_a_first_analysis_that_fails_to_write_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from cpt_lightning.analysis import report
    from cpt_lightning.errors import UserError

    def full_disk(result, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "save_plot", full_disk)
    result = report.LayerMetrics(layers=[-1, 0], metrics={"cka": {"a": [1.0, 0.5]}})
    with pytest.raises(UserError, match=r"\(No space left on device; free space on that disk\); nothing of it is left$"):
        report.write_all(result, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_write_over_part_of_an_earlier_analysis_says_it_is_intact(tmp_path, monkeypatch):
    import errno

    from cpt_lightning.analysis import report

    def full_disk(result, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "layers.csv").write_text("earlier")  # one of the four outputs: still an earlier analysis
    monkeypatch.setattr(report, "save_plot", full_disk)
    with pytest.raises(UserError, match="the earlier analysis there is intact$"):
        report.write_all(report.LayerMetrics(layers=[-1], metrics={"cka": {"a": [1.0]}}), tmp_path / "out")
    assert (tmp_path / "out" / "layers.csv").read_text() == "earlier"


def test_a_write_clears_what_a_killed_analysis_left_and_keeps_one_being_written(tmp_path):
    """A SIGKILL during the write left its hidden staging folder in --out for good."""
    import os
    import time

    from cpt_lightning.analysis import report

    killed, fresh = tmp_path / "out" / ".layers.tmp-killed", tmp_path / "out" / ".layers.tmp-starting"
    for folder in (killed, fresh):
        folder.mkdir(parents=True)
        (folder / "layers.csv").write_text("half")
    os.utime(killed, (time.time() - 3600,) * 2)
    report.write_all(report.LayerMetrics(layers=[-1, 0], metrics={"cka": {"a": [1.0, 0.5]}}), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".layers.tmp-starting", *report.OUTPUTS]


def test_a_failed_write_keeps_the_earlier_analysis_whole(zoo, probe_file, tmp_path, monkeypatch, capsys):
    """Written in place, a full disk at layers.json left it empty beside the new layers.csv and the earlier plot."""
    import errno

    from cpt_lightning.analysis import report

    common = ["--probe", probe_file, "--out", tmp_path / "out", "--seq-len", 32, "--num-sequences", 4]
    assert run_main(f"base={zoo['base']}", f"a={zoo['detour1']}", *common) == 0
    (tmp_path / "out" / "notes.txt").write_text("the user's own")
    earlier = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}

    def full_disk(result, path):
        path.write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_json", full_disk)
    capsys.readouterr()
    assert run_main(f"base={zoo['base']}", f"b={zoo['baseline3']}", *common) == 2
    assert capsys.readouterr().err.endswith(f"error: could not write the analysis in {tmp_path / 'out'} (No space left "
                                            "on device; free space on that disk); the earlier analysis there is intact\n")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == earlier


def test_a_transplant_is_not_written_into_a_model_folder(zoo, tmp_path, capsys):
    target = shutil.copytree(zoo["baseline3"], tmp_path / "target")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert run_main(zoo["detour1"], target, "--transplant", "0-0", "--out", target) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_a_transplant_keeps_a_model_written_to_its_folder_meanwhile(zoo, tmp_path, capsys, monkeypatch):
    """--out is checked empty at the start; a folder another command filled since was replaced at the end."""
    import cpt_lightning.analysis.transplant as transplant

    out, save_model = tmp_path / "out", transplant.save_model

    def save_while_another_lands(model, folder, shown_as=None):
        save_model(model, folder, shown_as)
        shutil.copytree(zoo["baseline3"], out)

    monkeypatch.setattr(transplant, "save_model", save_while_another_lands)
    before = {p.name: p.read_bytes() for p in Path(zoo["baseline3"]).iterdir()}
    assert run_main(zoo["detour1"], zoo["baseline3"], "--transplant", "0-0", "--out", out) == 2
    assert capsys.readouterr().err.endswith(f"error: {out} was written by another command while this transplanted "
                                            "model was made: that is kept, and nothing of this transplanted model is "
                                            "left behind\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and sorted(tmp_path.iterdir()) == [out]


def test_a_transplant_into_the_current_folder_is_refused(zoo, tmp_path, capsys, monkeypatch):
    """``--out .`` in an empty folder built the model, then failed with a traceback in the rename (the current
    folder has no name to move aside)."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run_main(zoo["detour1"], zoo["baseline3"], "--transplant", "0-0", "--out", ".") == 2
    assert "--out . is the current folder or holds it" in capsys.readouterr().err
    assert not any((tmp_path / "here").iterdir())


def test_a_model_with_another_tokenizer_is_refused(zoo, probe_file, tmp_path, capsys):
    """Only the id range was checked: a model whose tokenizer maps words to other ids was fed the
    base tokenizer's ids, and its CKA compared representations of different words, silently."""
    other = shutil.copytree(zoo["baseline3"], tmp_path / "other_ids")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġof"] = vocab["Ġof"], vocab["Ġthe"]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main([f"base={zoo['base']}", f"other={other}", "--probe", probe_file, "--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: other") and "tokenizer" in last


def test_a_mistyped_run_folder_is_named_without_asking_the_hub(zoo, tmp_path, monkeypatch):
    """`runs/detuor` has one slash like a hub id: it went to the hub, which retried for 23 s offline."""
    from transformers import AutoConfig

    from cpt_lightning.analysis.models import require_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **kw: pytest.fail("asked the hub"))
    with pytest.raises(UserError, match="runs/detuor: no such folder or checkpoint"):
        require_model("runs/detuor")


def test_seed_metrics_keep_float64_precision_near_cka_one():
    """Layers that barely move (frozen, or late in a decay) have CKA within 1e-9 of 1: in float32 their seed noise
    and noise ratio came out 0, inf or null."""
    from cpt_lightning.analysis.seeds import seed_metrics

    arms = {"a": ["a-1", "a-2"], "b": ["b-1", "b-2"]}
    cka = {("a-1", "a-2"): [1 - 1e-9], ("b-1", "b-2"): [1 - 3e-9]}
    cka.update({(x, y): [1 - 4e-9] for x in arms["a"] for y in arms["b"]})
    metrics = seed_metrics(cka, arms)
    assert metrics["seed_noise"]["a"] == pytest.approx([1e-9], rel=1e-5)
    assert metrics["noise_ratio"]["a_vs_b"] == pytest.approx([2.0], rel=1e-5)


def test_each_layer_is_shifted_by_its_own_mean():
    """An outlier dimension of a deeper layer alone (ModernBERT's have them): shifted by another layer's mean, its
    variance drowned in float64 and its CKA came out wrong."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(8, 8, generator=gen, dtype=torch.float64) + torch.randn(400, 8, generator=gen, dtype=torch.float64)
    deep = y.clone()
    deep[:, 0] += 1e6
    cka = StreamingCKA([("x", "y")])
    for xb, yb, db in zip(x.chunk(4), y.chunk(4), deep.chunk(4)):
        cka.update({"x": [xb, xb], "y": [yb, db]})
    first, second = cka.compute()[("x", "y")]
    assert second == pytest.approx(first, abs=1e-10)


def test_the_plot_labels_the_embeddings_and_layer_zero_apart():
    figure = make_figure(LayerMetrics(layers=[-1, 0, 1], metrics={"cka": {"a_vs_b": [1.0, 0.9, 0.8]}}))
    assert [tick.get_text() for tick in figure.axes[-1].get_xticklabels()] == ["emb", "0", "1"]

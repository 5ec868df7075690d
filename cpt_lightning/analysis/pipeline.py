"""One analysis run: load the models, weight drift from the base, streaming CKA over the probe rows."""

from __future__ import annotations

import torch
from tqdm import tqdm

from cpt_lightning.analysis.cka import StreamingCKA
from cpt_lightning.analysis.drift import relative_drift
from cpt_lightning.analysis.models import check_probe_fits, check_same_depth, layer_features, load_encoder
from cpt_lightning.analysis.probe import separator_id
from cpt_lightning.analysis.report import LayerMetrics
from cpt_lightning.analysis.seeds import Pair, pair_name, seed_metrics, seed_pairs
from cpt_lightning.data.packing import position_ids_from_separators
from cpt_lightning.errors import UserError


def load_models(paths: dict[str, str], device: torch.device) -> dict[str, torch.nn.Module]:
    """Each distinct path is loaded once, even when it is both a named model and an arm seed."""
    loaded = {path: load_encoder(path, device) for path in dict.fromkeys(paths.values())}
    return {name: loaded[path] for name, path in paths.items()}


def drift_from_base(models: dict[str, torch.nn.Module]) -> dict[str, list[float]]:
    """Relative weight change per layer of every model against the first (the base)."""
    base_name, *others = models
    base = models[base_name].state_dict()
    drift = {}
    for name in others:
        try:
            drift[name] = list(relative_drift(base, models[name].state_dict()).values())
        except UserError as err:
            raise UserError(f"{name} against the base {base_name}: {err}") from None
    return drift


def check_distinct_seeds(models: dict[str, torch.nn.Module], arms: dict[str, list[str]], paths: dict[str, str]) -> None:
    """Two identical members of an arm (one run given twice, a rerun with the same seed) would count as zero
    seed noise and inflate every noise ratio; one run in two arms would count as zero divergence between them
    and deflate their ratio."""
    arm_of = {member: arm for arm, members in arms.items() for member in members}
    for a, b in seed_pairs(arms):  # each arm's pairs first
        if not identical(models[a], models[b]):
            continue
        if arm_of[a] == arm_of[b]:
            raise UserError(
                f"--arm {arm_of[a]}: {paths[a]} and {paths[b]} have identical weights (the same run twice, or a "
                "rerun with the same seed); seed noise needs runs that differ by their seed"
            )
        raise UserError(
            f"--arm {arm_of[a]} and --arm {arm_of[b]} share a run: {paths[a]} and {paths[b]} have identical weights; "
            "the divergence between arms needs runs of each arm's own"
        )


def identical(model_a: torch.nn.Module, model_b: torch.nn.Module) -> bool:
    weights_a, weights_b = model_a.state_dict(), model_b.state_dict()
    return all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


def stream_cka(
    models: dict[str, torch.nn.Module], rows: torch.Tensor, pairs: list[Pair], tokenizer, batch_size: int, device: torch.device
) -> tuple[dict[Pair, list[float]], int]:
    """Per-layer CKA of each pair over all probe rows, and how many tokens it was measured on."""
    cka = StreamingCKA(pairs)
    needed = {name for pair in pairs for name in pair}
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device)
    separator = separator_id(tokenizer)
    tokens = 0
    for batch in tqdm(rows.split(batch_size), desc="probe batches", unit="batch"):
        batch = batch.to(device)
        keep = ~torch.isin(batch, special)
        if not keep.any():
            continue
        positions = position_ids_from_separators(batch, separator)
        distinct = {id(models[name]): models[name] for name in needed}
        features = {key: layer_features(model, batch, positions, keep) for key, model in distinct.items()}
        cka.update({name: features[id(models[name])] for name in needed})
        tokens += int(keep.sum())
    if tokens == 0:
        raise UserError("the probe rows hold only special tokens; nothing to compare")
    return cka.compute(), tokens


def analyze(
    paths: dict[str, str],
    arms: dict[str, list[str]],
    pairs: list[Pair],
    rows: torch.Tensor,
    tokenizer,
    batch_size: int,
    device: torch.device,
) -> LayerMetrics:
    """CKA of ``pairs``, drift of every model from the first, and the seed-noise summary of ``arms``."""
    models = load_models(paths, device)
    depth = check_same_depth(models)
    check_probe_fits(models, rows)
    drift = drift_from_base(models)  # weights only: a model of another shape is refused before the probe runs
    check_distinct_seeds(models, arms, paths)
    cka, tokens = stream_cka(models, rows, pairs + seed_pairs(arms), tokenizer, batch_size, device)
    metrics = {"cka": {pair_name(pair): cka[pair] for pair in pairs}, "drift": drift}
    if arms:
        metrics.update(seed_metrics(cka, arms))
    meta = {"base": next(iter(paths)), "models": paths, "arms": arms, "probe_tokens": tokens}
    return LayerMetrics(layers=list(range(-1, depth)), metrics=metrics, meta=meta)

"""Command line of ``cpt analyze``: parse models, arms and probe; run the analysis or a transplant."""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
from itertools import combinations
from pathlib import Path

from cpt_lightning.analysis.models import check_same_tokenizer, load_model_tokenizer, require_model
from cpt_lightning.analysis.seeds import PAIR_JOIN
from cpt_lightning.atomic import check_output_folder
from cpt_lightning.devices import resolve_device
from cpt_lightning.errors import ArgumentParser, UserError, command, tokenizer_load_reason
from cpt_lightning.weights_digest import update_with_file, weights_digest

EXAMPLES = """examples:
  cpt analyze base=hf/base detour=runs/detour/export/phase1-mlm --out analysis/   (probe: the run's holdout)
  cpt analyze base=hf/base clm_end=runs/clm detour=runs/detour mlm=runs/mlm --probe data/pubmed --out analysis/
  cpt analyze base=hf/base --arm detour=runs/d1,runs/d2 --arm mlm=runs/m1,runs/m2 --probe probe.jsonl --out seeds/
  cpt analyze runs/detour runs/mlm --transplant 0-7 --out runs/mlm_with_detour_0-7
"""


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="cpt analyze",
        description="Per-layer linear CKA and relative weight drift between encoders.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", nargs="+", metavar="[NAME=]PATH",
                        help="HF model folders or cpt fit checkpoints (.ckpt file or sharded folder); "
                        "the first is the base that drift is measured from")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=PATH,PATH[,...]",
                        help="seeds of one training arm (repeatable): reports divergence in units of seed noise")
    parser.add_argument("--probe", help=".jsonl (text field), .txt (one document per line), a folder written by "
                        "cpt prepare (its holdout/ if it has one, else its last rows) or a run's config.yaml (the "
                        "holdouts of its sources, split by weight). Default: the run config of the models "
                        "(the one a checkpoint holds, or training_config.yaml in an exported folder)")
    parser.add_argument("--tokenizer", help="tokenizer name or folder (default: the base model's own: its folder's, "
                        "or the one a checkpoint's run recorded)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (with --transplant: the exported model folder)")
    parser.add_argument("--pairs", choices=("all", "base"), default="all",
                        help="CKA between every two positional models, or between the base and each other one "
                        "(default all); --arm seeds are compared with each other, under seed_cka")
    parser.add_argument("--num-sequences", type=positive_int, default=512, help="probe rows (default 512)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per probe row (default 512)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="probe rows per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="torch device for the forward passes (default auto: cuda "
                        "when there is one, else cpu)")
    parser.add_argument("--transplant", metavar="I-J",
                        help="instead of analysing: copy layers I..J (inclusive) of the first model into the "
                        "second and save the result to --out")
    return parser


def parse_model(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its folder); a folder of the current one named ``lr=1e-3`` is that
    folder (split, the model ``1e-3`` was looked for on the hub)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        if not path:  # the current folder was read as the model, and named as '' in the refusal
            raise UserError(f"{spec!r}: expected NAME=PATH, a path after the '='")
        return name, path
    return Path(spec).name or spec, spec


def parse_arm(spec: str) -> tuple[str, list[str]]:
    name, sep, paths = spec.partition("=")
    members = [path for path in paths.split(",") if path]
    if not sep or not name or not members:
        raise UserError(f"--arm {spec!r}: expected NAME=PATH,PATH[,...]")
    return name, members


def collect_models(args) -> tuple[dict[str, str], dict[str, list[str]]]:
    """All models by unique name (base first, then the others, then arm seeds ``ARM-1``, ``ARM-2``...) and arms."""
    named = [parse_model(spec) for spec in args.models]
    arms = {}
    for spec in args.arm:
        arm, members = parse_arm(spec)
        if arm in arms:
            raise UserError(f"--arm {arm} is given twice")
        arms[arm] = [f"{arm}-{i}" for i in range(1, len(members) + 1)]
        named += list(zip(arms[arm], members))
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise UserError(f"model names must be unique, got {names}: name them NAME=PATH")
    if joined := [name for name in names if PAIR_JOIN in name]:  # a_vs_b with c, a with b_vs_c: one series, one lost
        raise UserError(f"model name {joined[0]!r} holds {PAIR_JOIN!r}, which joins two names in a pair's series "
                        f"(A{PAIR_JOIN}B): name it NAME=PATH without it")
    return dict(named), arms


def comparison_pairs(names: list[str], mode: str) -> list[tuple[str, str]]:
    if mode == "base":
        return [(names[0], other) for other in names[1:]]
    return list(combinations(names, 2))


def run_analysis(args) -> None:
    from cpt_lightning.analysis.pipeline import analyze
    from cpt_lightning.analysis.probe import default_probe, load_probe
    from cpt_lightning.analysis.report import write_all

    device = resolve_device(args.device)  # before any model or probe is read
    paths, arms = collect_models(args)
    for path in paths.values():
        require_model(path)
    if len(paths) < 2:
        raise UserError("give at least two models (the base and one to compare), or --arm seeds")
    if arms and not any(len(members) > 1 for members in arms.values()):
        raise UserError("seed noise needs an --arm with two or more seeds")
    digests = {name: content_digest(path) for name, path in paths.items()}  # before anything of them is read
    probe_path, run_config = args.probe, None
    if probe_path is None:
        probe_path, run_config = default_probe(list(paths.values()))
        print(f"probe: the holdouts of the training sources in {probe_path} (no --probe given)", file=sys.stderr)
    tokenizer = probe_tokenizer(args.tokenizer, next(iter(paths.values())))
    check_same_tokenizer(paths, tokenizer)
    probe = load_probe(probe_path, tokenizer, args.seq_len, args.num_sequences, run_config)
    positional = [parse_model(spec)[0] for spec in args.models]
    pairs = comparison_pairs(positional, args.pairs)
    result = analyze(paths, arms, pairs, probe.rows, tokenizer, args.batch_size, device)
    check_weights_unchanged(paths, digests)
    result.meta["weights_digests"] = digests
    result.meta["probe"] = {
        "path": probe_path, "given": args.probe is not None, "held_out": probe.held_out, "read": probe.read,
        "sequences": len(probe.rows), "seq_len": args.seq_len,
    }
    write_all(result, args.out)
    print(f"wrote {args.out}/layers.png, layers.csv, layers.json and tensorboard/")


def content_digest(path: str) -> str | None:
    """What ``layers.json`` records of a model, as it was read: an HF folder's ``weights_digest`` (results.json's),
    a training checkpoint's files by their bytes (a ``last.ckpt`` its fit replaces); None for a hub name, ``.bin``
    weights or files that cannot be read (the loader says why)."""
    from cpt_lightning.export import is_training_checkpoint

    try:
        if not is_training_checkpoint(path):
            return weights_digest(path)
        digest = hashlib.sha256()
        for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            if file.is_file():
                digest.update(str(file.relative_to(path)).encode())
                update_with_file(digest, file)
        return digest.hexdigest()
    except (OSError, ValueError, KeyError, struct.error):  # a weights file cut short: damaged, or being written
        return None


def check_weights_unchanged(paths: dict[str, str], digests: dict[str, str | None]) -> None:
    """A model written over while it was analyzed (an export replaced, a ``last.ckpt`` its fit saved again) gave the
    figures of other weights, or of the old ones, under its path, exit 0: ``layers.json`` records each model's
    ``content_digest`` as it was read."""
    for name, path in paths.items():
        if content_digest(path) != digests[name]:
            raise UserError(f"{name}={path}: its weights changed while it was analyzed (an export or checkpoint "
                            "written over it?); run cpt analyze again once it is complete")


def probe_tokenizer(name: str | None, base: str):
    """``--tokenizer``, else the base model's own."""
    if name is None:
        return load_model_tokenizer(base)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"--tokenizer {name}: cannot load a tokenizer from it ({tokenizer_load_reason(name, err)})") from None


def parse_layer_range(text: str) -> range:
    """``I-J`` (inclusive) or ``I`` → range(I, J + 1)."""
    first, dash, last = text.partition("-")
    if not first.isdigit() or not (last if dash else first).isdigit() or int(last or first) < int(first):
        raise UserError(f"--transplant {text!r}: expected I-J with 0 <= I <= J, e.g. 0-7")
    return range(int(first), int(last or first) + 1)


ANALYSIS_ONLY = ("probe", "tokenizer", "pairs", "num_sequences", "seq_len", "batch_size", "device")


def run_transplant(args) -> None:
    from cpt_lightning.analysis.transplant import transplant

    layers = parse_layer_range(args.transplant)
    if len(args.models) != 2 or args.arm:
        raise UserError("--transplant takes exactly two models: SOURCE (gives the layers) and TARGET (the rest)")
    defaults = build_parser()
    if given := [f"--{dest.replace('_', '-')}" for dest in ANALYSIS_ONLY
                 if getattr(args, dest) != defaults.get_default(dest)]:
        raise UserError(f"{', '.join(given)}: the analysis's, which --transplant does not run (it ignored them); "
                        "leave them out, or analyze the transplanted model afterwards")
    (_, source), (_, target) = (parse_model(spec) for spec in args.models)
    require_model(source)
    require_model(target)
    transplant(source, target, layers, args.out)
    print(f"wrote {args.out}: layers {layers.start}-{layers.stop - 1} from {source}, the rest from {target}")


@command
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_output_folder(args.out, "--out")
    if args.transplant is not None:  # "" too: a full analysis was written into the model folder meant
        run_transplant(args)
    else:
        run_analysis(args)
    return 0

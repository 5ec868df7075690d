"""The Markdown tables of ``cpt bench`` reports: one report's (printed by ``cpt bench``) and several compared
(``scripts/bench_table.py``). Plain Python: reading reports needs neither torch nor Lightning."""


def cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """A Markdown table, one row per objective, under a line naming the setup."""
    header = (
        f"{report['device']} × {report['world_size']}, {report['precision']}, {report['attn_implementation']}, "
        f"compile {'on' if report['compile'] else 'off'}, "
        f"micro-batch {report['micro_batch_size']} × block {report['block_size']} × accumulation "
        f"{report['accumulate_grad_batches']}; {report['steps']} step{'s' * (report['steps'] != 1)} after "
        f"{report['warmup_steps']} warm-up"
    )
    lines = [
        header, "",
        "| objective | tokens/s | tokens/s/device | s/step | micro-batches/step | tokens/step | GFLOP/token | MFU "
        "| GFLOP/token doc-masked | MFU doc-masked | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        flops = None if row["flops_per_token"] is None else row["flops_per_token"] / 1e9
        masked = None if row["document_masked_flops_per_token"] is None else row["document_masked_flops_per_token"] / 1e9
        cells = [
            row["objective"], cell(row["tokens_per_s"], ",.0f"), cell(row["tokens_per_s_per_device"], ",.0f"),
            cell(row["step_time_s"], ".3f"), cell(row["micro_batches_per_step"], "g"), cell(row["tokens_per_step"], ",.0f"),
            cell(flops, ".3f"), cell(row["mfu"], ".1%"), cell(masked, ".3f"), cell(row["mfu_document_masked"], ".1%"),
            cell(row["peak_memory_gib"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [f"note: {note}" for note in report["notes"]])


def compare_table(reports: dict[str, dict]) -> str:
    """One Markdown table over several reports (name → report), each row's tokens/s as a ratio to the
    first report's row of the same objective: speed-ups measured on one machine, in one session."""
    first = next(iter(reports.values()))
    baseline = {row["objective"]: row["tokens_per_s_per_device"] for row in first["results"]}
    versions = first["versions"]
    lines = [
        f"{first['device']} × {first['world_size']}, {first['precision']}, torch {versions['torch']} (CUDA "
        f"{versions['cuda']}), transformers {versions['transformers']}, flash-attn {versions['flash_attn']}, "
        f"{first['date']}; ratios against {next(iter(reports))}",
        "",
        "| run | attention | compile | micro-batch × accumulation | objective | tokens/s/device | × first | s/step | MFU "
        "| MFU doc-masked | peak GiB |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, report in reports.items():
        for row in report["results"]:
            base = baseline.get(row["objective"])
            cells = [
                name, report["attn_implementation"], "yes" if report.get("compile") else "no",
                f"{report['micro_batch_size']} × {report['accumulate_grad_batches']}", row["objective"],
                cell(row["tokens_per_s_per_device"], ",.0f"),
                cell(row["tokens_per_s_per_device"] / base if base else None, ".2f"), cell(row["step_time_s"], ".3f"),
                cell(row["mfu"], ".1%"), cell(row["mfu_document_masked"], ".1%"), cell(row["peak_memory_gib"], ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    for name, report in reports.items():  # a run cut short (a time limit, out of memory) wrote what it had measured
        if report.get("not_measured"):
            lines.append(f"note: {name} is incomplete: {', '.join(report['not_measured'])} not measured")
    # the header names the first report's setup only: a ratio across these is not the change its row names
    for key, unlike in (("device", "not one machine"), ("precision", "not one precision"),
                        ("world_size", "not one device count")):
        others = sorted({str(report[key]) for report in reports.values()} - {str(first[key])})
        if others:
            lines.append(f"note: {unlike}: {first[key]} and {', '.join(others)}; the ratios compare different "
                         f"{key.replace('_', ' ')}s")
    return "\n".join(lines)

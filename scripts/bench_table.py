"""One Markdown table from several `cpt bench` JSON reports, tokens/s as ratios to the first; a report that is not
there or cannot be read (a stage skipped, or cut before or while it wrote one) is left out with a note.

    python3 scripts/bench_table.py runs/bench/sdpa.json runs/bench/flex.json ...
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, with or without a venv
from cpt_lightning.bench_tables import compare_table  # noqa: E402


def read_report(path: str) -> dict | None:
    """The report, or None (noted) when it cannot be read: one torn by a kill must not cost the others' table."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        print(f"note: {path}: cannot read a JSON report ({err}): left out", file=sys.stderr)
        return None
    if not isinstance(report, dict) or not {"results", "device", "versions"} <= report.keys():
        sys.exit(f"error: {path} is not a cpt bench report (no results/device/versions)")
    return report


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) > 1 else 2)
    paths = [path for path in sys.argv[1:] if Path(path).is_file()]
    for missing in sorted(set(sys.argv[1:]) - set(paths)):
        print(f"note: {missing} is not there (its stage skipped, or cut before it wrote a report): left out",
              file=sys.stderr)
    if not paths:
        sys.exit("error: none of the reports is there")
    names = [Path(path).stem for path in paths]  # a row's name; two sessions' sdpa.json would share one
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        sys.exit(f"error: reports named alike ({', '.join(repeated)}.json): a row would replace another; "
                 "give each report its own file name")
    reports = {name: report for name, path in zip(names, paths) if (report := read_report(path)) is not None}
    if not reports:
        sys.exit("error: none of the reports can be read")
    print(compare_table(reports))

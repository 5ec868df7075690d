"""One Markdown table from several `cpt bench` JSON reports, tokens/s as ratios to the first.

    python3 scripts/bench_table.py runs/bench/sdpa.json runs/bench/flex.json ...
"""

import json
import sys
from pathlib import Path

from cpt_lightning.bench import compare_table

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip())
    print(compare_table({Path(path).stem: json.loads(Path(path).read_text()) for path in sys.argv[1:]}))

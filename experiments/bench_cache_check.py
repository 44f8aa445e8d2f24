"""What checking an embedding cache entry costs against encoding it: every read verifies the entry's checksum.

Times reading each corpus entry of the cache (open, shape check, BLAKE2b of ``embeddings.npy``: what every cache hit
does) over 5 repeats, against the seconds its encoding took (recorded in the entry's ``meta.json``).

    .venv/bin/python experiments/bench_cache_check.py   # writes experiments/results/bench_cache_check.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from sbmoe.files import write_atomic
from sbmoe.paths import cache_dir
from sbmoe.retrieval.cache import read_entry

OUTPUT = Path(__file__).resolve().parent / "results" / "bench_cache_check.json"


def main() -> None:
    entries = []
    for folder in sorted(cache_dir().glob("corpus-*")):
        meta = json.loads((folder / "meta.json").read_text())
        if meta["count"] < 1000:
            continue
        times = []
        for _ in range(5):
            start = time.perf_counter()
            embeddings, _ = read_entry(folder)
            times.append(time.perf_counter() - start)
            del embeddings
        check = statistics.median(times)
        entries.append(
            {
                "entry": folder.name,
                "documents": meta["count"],
                "dim": meta["dim"],
                "megabytes": round((folder / "embeddings.npy").stat().st_size / 2**20, 1),
                "encode_s": meta["seconds"],
                "check_s": round(check, 4),
                "check_share": round(check / meta["seconds"], 6),
            }
        )
        print(entries[-1])
    record = {"command": "python experiments/bench_cache_check.py", "entries": entries}
    write_atomic(OUTPUT, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

"""The README's two commands as a new user runs them: a fresh clone of HEAD beside this checkout, ``make demo``
(which installs the ``.venv`` itself, into an empty embedding cache), then ``make test`` with ``CI=true``; wall time,
exit status, the test count and what the demo printed (its ``out/demo/demo.json``).

    .venv/bin/python experiments/fresh_clone.py   # writes experiments/results/fresh_clone.json (about 12 minutes)

The clone sits beside this checkout so that ``../shared`` resolves as it does here; it is removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sbmoe.files import write_atomic  # noqa: E402

OUTPUT = REPO / "experiments" / "results" / "fresh_clone.json"


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> dict[str, object]:
    """Run ``command``; its wall time, exit status and the last lines of its output."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    return {"seconds": time.perf_counter() - start, "returncode": done.returncode, "tail": output[-2000:]}


def main() -> None:
    clone = REPO.parent / f"fresh-clone-{os.getpid()}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env["SBMOE_CACHE"] = str(clone / "empty-cache")  # a new user's cache holds nothing yet
        demo = timed(["make", "demo"], clone, env)
        test = timed(["make", "test"], clone, {**env, "CI": "true"})
        passed = re.search(r"(\d+) passed", str(test["tail"]))
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True)
        result = {
            "commit": head.stdout.strip(),
            "cpu_count": os.cpu_count(),
            "make_demo": demo,
            "make_test": {**test, "passed": int(passed.group(1)) if passed else None},
            "demo": json.loads((clone / "out/demo/demo.json").read_text()) if demo["returncode"] == 0 else None,
        }
    finally:
        shutil.rmtree(clone, ignore_errors=True)
    write_atomic(OUTPUT, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("make_demo", "make_test")}, indent=1))
    print(
        f"make demo: {demo['seconds']:.0f} s (exit {demo['returncode']}); make test: {test['seconds']:.0f} s "
        f"(exit {test['returncode']}, {result['make_test']['passed']} passed)"
    )


if __name__ == "__main__":
    main()

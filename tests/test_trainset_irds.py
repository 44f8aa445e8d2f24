"""``irds:`` training data goes through the project's ir-datasets home: nothing is written beside the data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

LOAD = """
import json, sys
from sbmoe.data.trainset import load_train_set
train = load_train_set("irds:cranfield", data_dir=sys.argv[1])
print(json.dumps({"examples": len(train.examples), "queries": len(train.queries), "docs": len(train.docs)}))
"""


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_irds_train_data_writes_nothing_beside_the_data(shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "ir_datasets" / "cranfield").mkdir(parents=True)
    shutil.copy(shared_data / "ir_datasets" / "cranfield" / "cran.tar.gz", data / "ir_datasets" / "cranfield")
    before = listing(data)
    env = {k: v for k, v in os.environ.items() if k != "IR_DATASETS_HOME"}
    env |= {"SBMOE_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}
    # a fresh process: ir_datasets fixes its home when first imported
    done = subprocess.run([sys.executable, "-c", LOAD, str(data)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"examples": 1612, "queries": 225, "docs": 1400}
    assert listing(data) == before
    assert not (tmp_path / "home" / ".ir_datasets").exists()  # nor in ir-datasets' own default home
    assert (tmp_path / "cache" / "ir_datasets" / "cranfield" / "cran.tar.gz").is_symlink()

"""bench/data_parallel.py: a job's throughput over 1, 2, ... ranks, read from the runs it starts.

The local example's runs are minutes each; the same script runs a tiny job on 1 and 2 ranks through the real
`grpo train` (torchrun, gloo), and its table must say what those runs' metrics say.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.runtime.conftest import build_tiny_model
from tests.runtime.test_trainer import tiny_job

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import data_parallel  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_the_table_has_a_row_per_world_size_against_the_one_process_baseline(tiny_model_dir, tmp_path):
    doc = tiny_job(tiny_model_dir, tmp_path / "unused", promptsPerStep=4)
    doc["spec"]["evaluation"] = {"heldOut": 4}  # the bench turns it off: not the step's throughput
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "data_parallel.py"), "--job", str(job),
                           "--ranks", "1,2", "--steps", "3"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    header, one, two = done.stdout.strip().splitlines()[-3:]
    assert header.split() == ["ranks", "steps", "tokens/s", "per", "rank", "speed-up", "ideal", "efficiency"]
    assert one.split()[:2] == ["1", "3"] and one.split()[4:] == ["1.00x", "1.00x", "100%"]
    ranks, steps, tps, per_rank, speed_up, ideal, efficiency = two.split()
    assert (ranks, steps, ideal) == ("2", "3", "2.00x")
    assert float(per_rank) == pytest.approx(float(tps) / 2, abs=0.1)
    # the table's ratios come from the unrounded rates, the check from the printed ones (to 0.05): on a slow,
    # busy machine the rates are small and that rounding alone moves their ratio by more than 0.01
    low = (float(tps) - 0.05) / (float(one.split()[2]) + 0.05)
    high = (float(tps) + 0.05) / (float(one.split()[2]) - 0.05)
    assert low - 0.005 <= float(speed_up.rstrip("x")) <= high + 0.005
    assert 50 * low - 0.5 <= int(efficiency.rstrip("%")) <= 50 * high + 0.5


def test_tokens_per_second_leaves_the_first_step_out():
    records = [{"tokens_per_second": 1.0, "step_seconds": 100.0},  # warm-up: not counted
               {"tokens_per_second": 10.0, "step_seconds": 2.0}, {"tokens_per_second": 40.0, "step_seconds": 1.0}]
    assert data_parallel.tokens_per_second(records) == pytest.approx((20 + 40) / 3)

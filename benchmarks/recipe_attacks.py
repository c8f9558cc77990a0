"""Time ``edgesmith recipe check`` on hostile recipe files (docs/security.md, issue 12 row 11).

Each document runs in its own process with a time limit, so a checkout without the limits (an
older edgesmith on ``PYTHONPATH``) shows its blow-up as "> LIMIT s" instead of hanging. Prints a
table and writes JSON.

    PYTHONPATH=$PWD python benchmarks/recipe_attacks.py --limit 60 --json /tmp/attacks.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD = "version: 1\nname: t\n"


def _laughs(levels: int) -> str:
    lines = ["  - &a0 x"]
    for i in range(1, levels + 1):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]")
    return HEAD + "labels:\n" + "\n".join(lines) + "\n"


CASES: dict[str, str] = {
    **{f"aliases, {n} levels (8^{n} values)": _laughs(n) for n in (5, 6, 7, 9)},
    "recursive alias": HEAD + "a: &a [*a]\n",
    "100 kB of '['": HEAD + "x: " + "[" * 100_000 + "\n",
    "1 MB of '['": HEAD + "x: " + "[" * 1_000_000 + "\n",
    "1 MB of small values": HEAD + "x:\n" + "- 1\n" * 260_000,
    "python tag": HEAD + "x: !!python/object/apply:os.system [id]\n",
}


def run_case(text: str, limit: float) -> dict[str, object]:
    """``edgesmith recipe check`` on ``text`` in a fresh process; seconds, exit code, first line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "edgesmith", "recipe", "check", str(path)],
                capture_output=True,
                text=True,
                timeout=limit,
                env=os.environ,
                cwd=tmp,  # not the checkout: `python -m` would import ./edgesmith from there
            )
        except subprocess.TimeoutExpired:
            return {"seconds": None, "exit": None, "error": f"> {limit:.0f} s (killed)"}
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return {
            "seconds": round(time.perf_counter() - t0, 2),
            "exit": proc.returncode,
            "error": (err[0] if err else "").replace(tmp, "")[:90],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per document")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    import edgesmith

    print(f"edgesmith from {Path(edgesmith.__file__).parent}")
    baseline = run_case(HEAD + "x: 1\n", args.limit)  # process start-up and imports
    print(f"baseline (a 3-line recipe, start-up and imports): {baseline['seconds']} s")
    results = {"baseline": baseline}
    print(f"{'document':36} {'bytes':>9} {'seconds':>8} {'exit':>5}  first line")
    for name, text in CASES.items():
        r = run_case(text, args.limit)
        results[name] = {**r, "bytes": len(text)}
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(f"{name:36} {len(text):>9} {secs:>8} {r['exit']!s:>5}  {r['error']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

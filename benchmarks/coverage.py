"""Line coverage of harness/ under the test suite (the main suite and the slow one), with each
range of lines no test runs and why.

    python benchmarks/coverage.py            # both suites under coverage.py: about 25 minutes on 2 CPU cores
    python benchmarks/coverage.py --render   # coverage.md again from the committed coverage.json

Job processes (forked from the job server or spawned), rank processes and SLURM tasks are
measured too: coverage.py's `patch = subprocess, _exit, fork` starts it in every Python process
the tests start and saves each one's data when it exits, in parallel files combined at the end.
A process killed with SIGKILL (the tests that kill jobs) saves nothing. The summary goes to
benchmarks/results/coverage.md, with each uncovered range's reason from REASONS below (keyed by
module and function); a range without one is listed as "no test runs it yet". The raw numbers go to coverage.json.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "coverage.md"
RC = """[run]
source = {source}
parallel = true
patch = subprocess, _exit, fork
data_file = {data}
[report]
precision = 1
"""

# Why no test runs a range, by "module:function" (the function holding the range, "" at module level).
REASONS: dict[str, str] = {}


def enclosing_functions(path: Path) -> dict[int, str]:
    """Line -> the name of the innermost function holding it (absent at module level)."""
    names: dict[int, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):  # breadth first: an inner function after its outer one
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                names[line] = node.name
    return names


def ranges(lines: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for line in sorted(lines):
        if out and line == out[-1][1] + 1:
            out[-1] = (out[-1][0], line)
        else:
            out.append((line, line))
    return out


def measure() -> dict:
    """Both suites under coverage; the combined JSON report, with the suites' exit codes."""
    work = Path(tempfile.mkdtemp(prefix="harness-coverage-"))
    rc = work / "coveragerc"
    rc.write_text(RC.format(source=REPO / "harness", data=work / ".coverage"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "COVERAGE_RCFILE": str(rc), "HARNESS_CACHE": str(work / "cache")}
    codes = {}
    for suite in ("not slow", "slow"):
        codes[suite] = subprocess.run([sys.executable, "-m", "coverage", "run", "-m", "pytest", "-q", "-p",
                                       "no:cacheprovider", "-m", suite], cwd=REPO, env=env).returncode
    subprocess.run([sys.executable, "-m", "coverage", "combine", "-q"], cwd=REPO, env=env, check=True)
    subprocess.run([sys.executable, "-m", "coverage", "json", "-q", "-o", str(work / "coverage.json")], cwd=REPO,
                   env=env, check=True)
    data = json.loads((work / "coverage.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    files = {str(Path(name).resolve().relative_to(REPO)): {"summary": f["summary"], "missing_lines": f["missing_lines"]}
             for name, f in data["files"].items()}
    return {"commit": commit, "exit_codes": codes, "totals": data["totals"], "files": files}


def render(data: dict) -> str:
    totals, codes = data["totals"], data["exit_codes"]
    lines = ["# Line coverage of harness/ under the test suite", "",
             f"`python benchmarks/coverage.py` at commit {data['commit']}: the main suite and the slow one "
             f"(exit codes {codes['not slow']} and {codes['slow']}), every Python process they start measured. "
             f"**{totals['percent_covered']:.1f}%** of {totals['num_statements']:,} statements run "
             f"({totals['missing_lines']:,} do not).", "",
             "| module | statements | missing | covered |", "|---|---|---|---|"]
    uncovered = []
    for module, f in sorted(data["files"].items()):
        s = f["summary"]
        lines.append(f"| {module} | {s['num_statements']} | {s['missing_lines']} | {s['percent_covered']:.1f}% |")
        functions = enclosing_functions(REPO / module)
        for start, end in ranges(f["missing_lines"]):
            where = functions.get(start, "")
            why = REASONS.get(f"{module}:{where}") or "no test runs it yet"
            uncovered.append(f"| {module} | {start}{'' if start == end else f'-{end}'} | {where or '(module)'} | {why} |")
    return "\n".join(lines + ["", "## Lines no test runs, and why", "", "| module | lines | in | why |",
                              "|---|---|---|---|", *uncovered]) + "\n"


def main(argv: list[str]) -> int:
    """`--render`: rewrite coverage.md from the committed coverage.json (after editing REASONS)."""
    raw = OUT.with_suffix(".json")
    if "--render" in argv:
        data = json.loads(raw.read_text())
    else:
        data = measure()
        raw.write_text(json.dumps(data, indent=1) + "\n")
    OUT.write_text(render(data))
    print(f"{data['totals']['percent_covered']:.1f}% covered; written to {OUT}")
    return 0 if not any(data["exit_codes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The GPU acceptance run's bookkeeping: one stage's record, then the summary and the archive, rewritten
after every stage so that a run killed at any point still returns what finished (bench/README.md).

    python bench/acceptance_report.py --results DIR --dest DIR stage NAME STATUS RC SECONDS LIMIT \
        [--result FILE] [--junit FILE] [--ranks N] [--command TEXT]
    python bench/acceptance_report.py --results DIR --dest DIR final

``stage`` writes ``DIR/NAME.json``: status, exit code, seconds, time box, command, and the stage's
own JSON result (``--result``). The status ``ok`` is checked against what the stage left:
``--junit`` (pytest's XML) turns ``ok`` into a failure when no test passed (all skipped: no CUDA)
or one failed; ``--ranks N`` reads the training workers' ``[rank r] finished: ... weights_sha256=H``
lines from ``DIR/NAME.log`` and fails the stage unless N ranks finished with one digest.
Then, as ``final`` does, it writes into ``--dest`` at most three files: ``summary.json`` (the
preflight's environment and imports, and per stage its status, seconds, key numbers and, when
it did not pass, its log's last lines),
``summary.txt`` (one line per stage) and ``stages.tar.gz`` (every file in ``--results``).
``final`` exits 1 when a stage failed or timed out (a skipped stage is reported, not failed),
else 0. Standard library only: it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

DIGEST = re.compile(r"\[rank (\d+)\] (finished|stopped): global_step=(\d+) .*?weights_sha256=([0-9a-f]+)")


def junit_status(path: Path) -> tuple[str | None, dict]:
    """(a failing status or None, counts) from pytest's JUnit XML."""
    if not path.is_file():
        return "failed: pytest wrote no report", {}
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if counts["failures"] or counts["errors"]:
        return f"failed: {counts['failures']} failed, {counts['errors']} errors", counts
    if counts["passed"] == 0:
        return f"failed: no test ran ({counts['skipped']} skipped)", counts
    return None, counts


def ranks_status(log: Path, ranks: int) -> tuple[str | None, dict]:
    """(a failing status or None, rank -> [state, step, digest]) from the workers' last lines."""
    found = {}
    if log.is_file():
        for m in DIGEST.finditer(log.read_text(errors="replace")):
            found[int(m.group(1))] = [m.group(2), int(m.group(3)), m.group(4)]
    if sorted(found) != list(range(ranks)):
        return f"failed: {len(found)} of {ranks} ranks reported their weights", found
    if len({d for _, _, d in found.values()}) != 1:
        return "failed: the ranks ended with different weights", found
    return None, found


def key_numbers(name: str, result) -> dict:
    """The few numbers of a stage's result that the summary shows."""
    if not isinstance(result, dict):
        return {}
    if "rows" in result and "config" not in result:  # bench/kernel_check.py
        rows = result["rows"]
        return {"comparisons": len(rows), "failed": [r for r in rows if not r["ok"]][:10]}
    if "cases" in result and "rows" not in result:  # bench/kernels.py
        done = result["cases"]
        return {"cases": len(done), "dtypes": sorted({c["dtype"] for c in done})}
    if "rows" in result:  # bench/train_step.py
        return {
            r["case"]: {
                k: round(r[k], 2) if isinstance(r.get(k), float) else r.get(k)
                for k in ("img_per_s", "step_ms", "host_ms_per_step", "first_step_s", "ops_per_step")
            }
            for r in result["rows"]
            if "case" in r
        }
    return {k: result[k] for k in ("AP", "global_step", "weights_sha256", "minutes") if k in result}


def log_tail(log: Path, lines: int = 6) -> list[str]:
    """The last lines of a stage's log: why it failed, in the summary itself."""
    if not log.is_file():
        return []
    return [line[:300] for line in log.read_text(errors="replace").splitlines()[-lines:]]


def record_stage(results: Path, args: argparse.Namespace) -> dict:
    status = args.status
    record = {
        "stage": args.name,
        "status": status,
        "rc": args.rc,
        "seconds": args.seconds,
        "timeout_s": args.limit,
        "command": args.command,
        "result": None,
    }
    if args.result and Path(args.result).is_file():
        try:
            record["result"] = json.loads(Path(args.result).read_text())
        except ValueError as e:
            record["result"] = f"unreadable: {e}"
    if status == "ok" and args.junit:
        failing, record["tests"] = junit_status(Path(args.junit))
        status = failing or status
    if status == "ok" and args.ranks:
        failing, record["ranks"] = ranks_status(results / f"{args.name}.log", args.ranks)
        status = failing or status
    record["status"] = status
    record["ended"] = time.time()
    (results / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    return record


def stage_records(results: Path) -> list[dict]:
    records = []
    for path in results.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "stage" in data and "status" in data:
            records.append(data)
    return sorted(records, key=lambda r: r.get("ended", 0.0))


def write_summary(results: Path, dest: Path) -> list[dict]:
    """summary.json, summary.txt and stages.tar.gz in ``dest``, each replaced whole (write, then rename)."""
    dest.mkdir(parents=True, exist_ok=True)
    preflight_path = results / "preflight.json"
    preflight = json.loads(preflight_path.read_text()) if preflight_path.is_file() else {}
    records = stage_records(results)
    summary = {
        "environment": preflight.get("environment"),
        "imports": {
            k: v.get("version") if v.get("ok") else "MISSING" for k, v in preflight.get("imports", {}).items()
        },
        "install": (results / "install.txt").read_text().splitlines()
        if (results / "install.txt").is_file()
        else [],
        "preflight_problems": preflight.get("problems"),
        "stages": {
            r["stage"]: {
                "status": r["status"],
                "seconds": r["seconds"],
                "timeout_s": r["timeout_s"],
                **({"tests": r["tests"]} if "tests" in r else {}),
                **({"ranks": r["ranks"]} if "ranks" in r else {}),
                "numbers": key_numbers(r["stage"], r.get("result")),
                **({"log_tail": log_tail(results / f"{r['stage']}.log")} if r["status"] != "ok" else {}),
            }
            for r in records
        },
    }
    lines = [
        f"{r['stage']:18s} {r['status']:48s} {r['seconds']:4d} s (box {r['timeout_s']} s)" for r in records
    ]
    for name, text in (
        ("summary.json", json.dumps(summary, indent=1)),
        ("summary.txt", "\n".join(lines) + "\n"),
    ):
        tmp = dest / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, dest / name)
    tmp = dest / ".stages.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(results.iterdir()):
            if path.is_file():
                tar.add(path, arcname=f"stages/{path.name}")
    os.replace(tmp, dest / "stages.tar.gz")
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True, help="the per-stage files")
    p.add_argument("--dest", type=Path, required=True, help="where summary.json/.txt and stages.tar.gz go")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stage")
    s.add_argument("name")
    s.add_argument("status")
    s.add_argument("rc", type=int)
    s.add_argument("seconds", type=int)
    s.add_argument("limit", type=int)
    s.add_argument("--result", help="the stage's own JSON result")
    s.add_argument("--junit", help="pytest's JUnit XML: ok needs a passed test and no failure")
    s.add_argument("--ranks", type=int, help="ok needs this many ranks finished with equal weights")
    s.add_argument("--command", default="", help="the stage's command line, as run")
    sub.add_parser("final")
    args = p.parse_args(argv)
    if args.what == "stage":
        record = record_stage(args.results, args)
        write_summary(args.results, args.dest)
        print(f"== {args.name}: {record['status']}")
        return 0
    records = write_summary(args.results, args.dest)
    print((args.dest / "summary.txt").read_text(), end="")
    return 1 if not records or any(r["status"].startswith(("failed", "timeout")) for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

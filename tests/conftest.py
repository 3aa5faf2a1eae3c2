"""Session-wide checks.

After the whole session, every log the tests wrote (`*.log` under pytest's temporary
directory: the workers', sinks', chaos runs' and replays' logs) is searched for every secret
the tests used: the Marketing API tokens and passwords the test modules define (module
constants named like `TOKEN` or `PASSWORD`), and the secured cluster's SCRAM passwords. A
secret in a log fails the session (SPEC §8: passwords never appear in logs), naming the file
and line number, not the secret.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SECRETS = REPO / ".state" / "cluster" / "secrets"
SECRET_NAME = re.compile(r"(^|_)(TOKEN|PASSWORD|SECRETS)$")


def known_secrets() -> set[str]:
    secrets = set()
    for name, module in list(sys.modules.items()):
        if not (name == "tests" or name.startswith("tests.")):
            continue
        for attribute, value in vars(module).items():
            if not SECRET_NAME.search(attribute):
                continue
            values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
            secrets |= {v for v in values if isinstance(v, str) and len(v) >= 8}
    if CLUSTER_SECRETS.is_dir():
        secrets |= {p.read_text().strip() for p in CLUSTER_SECRETS.glob("*.password")}
    return {s for s in secrets if s}


def leaks(root: Path, secrets: set[str]) -> list[str]:
    """`file:line` of every log line under `root` that holds one of `secrets`."""
    found = []
    for log in root.rglob("*.log"):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        found += [f"{log}:{n}" for n, line in enumerate(lines, 1) if any(s in line for s in secrets)]
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or getattr(factory, "_basetemp", None) is None:
        return                                   # no test used tmp_path: nothing was written
    found = leaks(factory.getbasetemp(), known_secrets())
    if found:
        print(f"\nSECRETS IN LOGS: {len(found)} log lines hold a token or password:\n  " + "\n  ".join(found[:20]),
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

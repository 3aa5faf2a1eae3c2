"""The session's secret scan (tests/conftest.py) finds a secret in a log, names the line and
not the secret, and ignores files that are not logs (a token file holds its token)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from tests.conftest import known_secrets, leaks

TOKEN = "tok-scan-check-8d2f"


def test_a_secret_in_a_log_is_found_by_file_and_line():
    # outside pytest's temporary directory, which the session's own scan reads
    with tempfile.TemporaryDirectory(prefix="secret-scan-") as scratch:
        check_a_planted_secret(Path(scratch))


def check_a_planted_secret(tmp_path: Path) -> None:
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "worker.log").write_text(f"started\nusing token {TOKEN} now\n")
    (tmp_path / "token").write_text(TOKEN)                    # not a log
    (tmp_path / "clean.log").write_text("nothing to see\n")
    found = leaks(tmp_path, {TOKEN})
    assert found == [f"{tmp_path / 'worker' / 'worker.log'}:2"]
    assert TOKEN not in "".join(found)


def test_the_secrets_come_from_the_test_modules():
    assert TOKEN in known_secrets()

"""A test that starts a real worker and then waits to be interrupted; tests/core/test_cleanup.py
runs it in a pytest of its own and kills that pytest."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import Services
from tests.support.procs import start_worker
from workers.dev.procs import Proc


def test_hold_a_worker(clean: Services, procs: list[Proc], tmp_path: Path) -> None:
    worker = start_worker("held", clean.worker_env(tmp_path), tmp_path)
    procs.append(worker)
    report = Path(os.environ["BCFY_PROBE_REPORT"])
    report.with_suffix(".tmp").write_text(f"{worker.pid}\n{clean.database_url}\n")
    report.with_suffix(".tmp").rename(report)
    while True:  # until the outer test signals this pytest
        time.sleep(0.1)

"""The short chaos soak (bench/soak.py, `make soak` runs the long one): killed pool children, a replaced
worker and a Redis restart while jobs and a batch run; every job and batch row is accounted for.

It uses the session's test database and a redis-server of its own on a free port, so restarting that
Redis disturbs no other test session sharing the development Redis.
"""
from __future__ import annotations

import pytest

from bench import soak
from tests.conftest import ROOT, TEST_SLOT


@pytest.mark.timeout(420)
def test_short_chaos_soak_loses_nothing(database):
    # under var/ (not tmp_path) so the stack's logs stay for a look after a failure
    report = soak.run(soak.SHORT, database, ROOT / "var" / f"soak-test{TEST_SLOT or ''}")
    print(soak.summary(report))
    jobs = report["jobs"]["counts"]
    assert report["jobs"]["problems"] == []
    assert jobs.get("succeeded") == soak.SHORT.jobs
    assert jobs.get("poisoned_failed") == soak.SHORT.poisoned
    assert jobs.get("duplicate_rows") == 0 and jobs.get("not_exactly_once", 0) == 0
    assert report["batch"]["ok"], report["batch"]
    assert soak.chaos_complete(report["chaos"], soak.SHORT), report["chaos"]
    assert report["ok"]

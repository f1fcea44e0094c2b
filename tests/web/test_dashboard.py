"""The dashboard in headless Chromium against a live gunicorn: each model's charts render with its data."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import upload
from tests.live import live_server  # noqa: F401  (fixture)
from tests.web.test_stats import FAILED, SUCCEEDED, add_jobs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class DashboardDom(HTMLParser):
    """The page state, and each chart's data attributes keyed by (model id or 'overview', chart kind)."""

    def __init__(self, html: str):
        super().__init__()
        self.state, self.section, self.charts, self.shapes = None, None, {}, {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "body":
            self.state = a.get("data-state")
        elif tag == "section":
            self.section = a.get("data-model-id") or a.get("id")
        elif tag == "figure" and "data-chart" in a:
            self.chart = (self.section, a["data-chart"])
            self.charts[self.chart] = {"points": int(a["data-points"]), "max": float(a["data-max"])}
            self.shapes[self.chart] = 0
        elif tag in ("path", "circle") and {"series", "dot"} & set(a.get("class", "").split()):
            self.shapes[self.chart] += 1  # a drawn line, or the dot of a lone point


def render(url: str, profile: Path) -> DashboardDom:
    """Load `url` in headless Chromium, let its scripts run and fetch, and parse the resulting DOM."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<body" in result.stdout, result.stderr[-2000:]
    return DashboardDom(result.stdout)


@pytest.fixture(scope="module")
def chromium() -> str:
    assert Path(CHROMIUM).exists(), "chromium is missing: `make test` installs Debian's chromium package"
    return CHROMIUM


def test_dashboard_charts_each_models_throughput_errors_and_latency(  # noqa: F811  (live_server)
        app, client, user, iris_model, live_server, chromium, tmp_path):
    owner_id = client.get("/api/v1/auth/me", headers=user["headers"]).json["id"]
    busy = upload(client, user["headers"], iris_model[0], name="busy")
    quiet = upload(client, user["headers"], iris_model[0], name="quiet")
    add_jobs(app, owner_id, busy["id"], SUCCEEDED + FAILED)
    add_jobs(app, owner_id, quiet["id"], SUCCEEDED[:2])
    key = client.post("/api/v1/auth/api-keys", headers=user["headers"], json={"name": "dashboard"}).json["key"]

    dom = render(f"{live_server.url}/dashboard#token={key}&window=1h", tmp_path / "profile")
    assert dom.state == "rendered"
    for model, jobs_in_busiest_minute in ((busy["id"], 9), (quiet["id"], 2)):
        throughput, errors, latency = (dom.charts[(model, kind)] for kind in ("throughput", "error-rate", "latency"))
        assert throughput["points"] >= 60 and throughput["max"] == jobs_in_busiest_minute
        assert latency["points"] >= 3 and dom.shapes[(model, "latency")] >= 3  # p50, p95, p99 drawn
        assert errors["points"] >= 1 and dom.shapes[(model, "throughput")] >= 1
    assert dom.charts[(busy["id"], "error-rate")]["max"] == 1.0  # seven minutes ago: one job, failed
    assert dom.charts[(quiet["id"], "error-rate")]["max"] == 0
    assert dom.charts[("overview", "throughput")]["max"] == 11


def test_dashboard_asks_for_a_token_and_drops_one_that_is_refused(live_server, chromium, tmp_path):  # noqa: F811
    assert render(f"{live_server.url}/dashboard", tmp_path / "fresh").state == "signed-out"
    refused = render(f"{live_server.url}/dashboard#token=iq_not-a-real-key", tmp_path / "refused")
    assert refused.state == "signed-out" and not refused.charts

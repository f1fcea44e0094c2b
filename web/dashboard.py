"""The dashboard: one page charting each model's throughput, error rate and latency from the stats API."""
from __future__ import annotations

from flask import Blueprint, Response, make_response, render_template

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/dashboard/static")

# the page runs only its own script and talks only to this origin
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@bp.get("/dashboard")
def dashboard() -> Response:
    """The page itself; it holds no data: its script signs in with a token kept in the browser."""
    response = make_response(render_template("dashboard.html"))
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"
    return response

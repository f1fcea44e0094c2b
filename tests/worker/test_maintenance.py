"""Recovery and housekeeping: a database outage during a write, lost batch messages, old results purged."""
from __future__ import annotations

import os
import time

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from common.queues import PURGE_RESULTS, RECONCILE_JOBS
from tests.conftest import upload
from tests.tcp_proxy import CuttableProxy
from tests.worker.test_batches import encode, frame_of, submit as submit_batch, wait_batch
from tests.worker.test_faults import _running_child
from tests.worker.test_jobs import submit, wait_job

ROW = [[5.0, 3.0, 1.5, 0.2]]


def _proxied(database_url: str) -> tuple[CuttableProxy, str]:
    url = make_url(database_url)
    host = url.query.get("host") or url.host
    if host and host.startswith("/"):
        proxy = CuttableProxy(f"{host}/.s.PGSQL.{url.port or 5432}")
    else:
        proxy = CuttableProxy((host or "127.0.0.1", url.port or 5432))
    query = {k: v for k, v in url.query.items() if k != "host"}
    return proxy, url.set(host="127.0.0.1", port=proxy.port, query=query).render_as_string(hide_password=False)


def test_result_write_survives_a_brief_database_outage(settings, user, iris_model, solo_worker):
    """A worker whose PostgreSQL vanishes mid-job retries the write; the job ends succeeded, once."""
    proxy, proxied_url = _proxied(settings.database_url)
    client, worker = solo_worker(DATABASE_URL=proxied_url)
    version = upload(client, user["headers"], iris_model[0], name="fault-slow-3")
    job = submit(client, user["headers"], version["id"], ROW).json
    _running_child([worker], job["id"], client, user["headers"])
    time.sleep(1)
    proxy.cut_off()
    time.sleep(5)  # the job's 3 s of work ends while the database is unreachable
    proxy.restore()
    done = wait_job(client, user["headers"], job["id"], seconds=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["result"]["predictions"] == iris_model[0].predict(ROW).tolist()


def test_batch_whose_messages_are_lost_is_finished_by_the_reconciler(client, app, user, workers, iris_model,
                                                                     redis_conn):
    from sklearn.linear_model import LogisticRegression
    import numpy as np

    frame = frame_of(60_000, seed=9)
    features = frame.drop(columns="row_id")
    model = LogisticRegression().fit(features, np.where(features["f0"] > 0, "yes", "no"))
    version = upload(client, user["headers"], model, name="recovered-batch")
    celery = app.extensions["celery"]
    celery.control.cancel_consumer("batches", reply=True)
    try:
        response = submit_batch(client, user["headers"], version["id"], encode(frame, "csv"), "lost.csv",
                                id_column="row_id")
        redis_conn.flushdb()  # the planning message is gone
    finally:
        celery.control.add_consumer("batches", reply=True)
    time.sleep(4.5)
    assert client.get(f"/api/v1/batches/{response.json['id']}", headers=user["headers"]).json["status"] == "queued"
    celery.send_task(RECONCILE_JOBS)
    batch = wait_batch(client, user["headers"], response.json["id"], seconds=120)
    assert batch["status"] == "succeeded" and batch["rows_done"] == 60_000


def test_purge_deletes_old_finished_jobs_and_batches(client, app, user, workers, iris_model, settings):
    version = upload(client, user["headers"], iris_model[0], name="purged")
    old = submit(client, user["headers"], version["id"], ROW, wait=20).json
    recent = submit(client, user["headers"], version["id"], ROW, wait=20).json
    batch = submit_batch(client, user["headers"], version["id"],
                         b"a,b,c,d\n5.0,3.0,1.5,0.2\n", "old.csv").json
    assert wait_batch(client, user["headers"], batch["id"])["status"] == "succeeded"
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE prediction_jobs SET finished_at = now() - interval '30 days' WHERE id = :id"),
                     {"id": old["id"]})
        conn.execute(sa.text("UPDATE batch_jobs SET finished_at = now() - interval '30 days' WHERE id = :id"),
                     {"id": batch["id"]})
    engine.dispose()
    batch_dir = os.path.join(settings.storage_root, user_id(client, user), "batches", batch["id"])
    assert os.path.isdir(batch_dir)
    app.extensions["celery"].send_task(PURGE_RESULTS)
    deadline = time.monotonic() + 30
    while client.get(f"/api/v1/jobs/{old['id']}", headers=user["headers"]).status_code != 404:
        assert time.monotonic() < deadline, "old job was not purged"
        time.sleep(0.2)
    assert client.get(f"/api/v1/jobs/{recent['id']}", headers=user["headers"]).status_code == 200
    assert client.get(f"/api/v1/batches/{batch['id']}", headers=user["headers"]).status_code == 404
    assert not os.path.exists(batch_dir)


def user_id(client, user) -> str:
    return client.get("/api/v1/auth/me", headers=user["headers"]).json["id"]


def test_a_job_submitted_while_redis_is_down_is_accepted_and_run_later(client, app, user, workers, iris_model,
                                                                        test_env):
    """The row is committed first; with no broker to publish to, the client still gets 202 and the
    reconciler enqueues the job once Redis answers (API key auth needs no Redis)."""
    import json
    import subprocess
    import sys

    version = upload(client, user["headers"], iris_model[0], name="broker-down")
    key = client.post("/api/v1/auth/api-keys", headers=user["headers"], json={"name": "outage"}).json["key"]
    script = f"""
import json
from web.app import create_app
client = create_app().test_client()
r = client.post("/api/v1/predict/{version['id']}", headers={{"X-API-Key": "{key}"}}, json={{"instances": {ROW}}})
print(json.dumps([r.status_code, r.json]))
"""
    env = {**os.environ, **test_env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    status, job = json.loads(out.stdout.strip().splitlines()[-1])
    assert status == 202 and job["status"] == "queued", out.stderr[-2000:]
    time.sleep(4.5)  # past JOB_STUCK_SECONDS
    app.extensions["celery"].send_task(RECONCILE_JOBS)
    assert wait_job(client, user["headers"], job["id"], seconds=60)["status"] == "succeeded"

"""Gunicorn settings for the billing API: ASGI through uvicorn's worker class.

Sized from the CPU count (2 workers per core, at most 8, override with WEB_CONCURRENCY). The app
is preloaded in the master so a bad configuration fails once at start-up, before any worker
forks; database connections open lazily in each worker after the fork. Prometheus metrics from
all workers are merged through PROMETHEUS_MULTIPROC_DIR. Access logs are written by the app
(JSON, with the request id and operation), so gunicorn's own access log is off.
"""

import multiprocessing
import os
import shutil
import tempfile

bind = os.environ.get("BIND", "127.0.0.1:8000")
worker_class = "uvicorn.workers.UvicornWorker"
workers = int(os.environ.get("WEB_CONCURRENCY", min(multiprocessing.cpu_count() * 2, 8)))
preload_app = True
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))  # a stuck worker is replaced
graceful_timeout = 20  # in-flight requests finish on SIGTERM
keepalive = 5  # behind a load balancer, keep-alive below its idle timeout
max_requests = 10_000
max_requests_jitter = 1_000
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="billing-metrics-")


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # type: ignore[no-untyped-def]
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

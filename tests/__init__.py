from tests import secret_scan  # noqa: F401  (watches every log line of the run)

"""``stepwise batch``: many prompts from a JSONL file, on a local process pool or on Ray, resumable.

Imported by the CLI only when ``batch`` runs; Ray is imported only with ``--ray`` (``batch/ray_backend.py``).
"""

from .jobs import KEYS, RESULTS, Job, Results, plan_item, read_jobs
from .run import Summary, run_batch
from .worker import BatchStopped

__all__ = ["BatchStopped", "KEYS", "RESULTS", "Job", "Results", "Summary", "plan_item", "read_jobs", "run_batch"]

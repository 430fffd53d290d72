"""`accelerate launch tests/fault_inject.py ARGS...`: `python -m orpo_dist.train ARGS...` with one fault
planted, for the 2-rank tests in test_hardening_round2.py (no rank may be left waiting).

ORPO_TEST_FAULT=<fault>:<rank> plants <fault> on that rank only (the Hub faults act on rank 0, the only
one that talks to the Hub).
"""

import errno
import os
import sys

fault, _, rank = os.environ["ORPO_TEST_FAULT"].partition(":")
here = os.environ.get("RANK", "0") == (rank or "0")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]) if args else None)


if fault == "checkpoint_full" and here:  # this rank's part of a checkpoint does not fit
    from orpo_dist.checkpoint import Checkpointer

    real_save_model = Checkpointer.save_model

    def save_model_then_full(self, model, path):
        real_save_model(self, model, path)
        disk_full(path)

    Checkpointer.save_model = save_model_then_full
elif fault == "cache_full" and here:  # the disk fills while this rank writes the tokenised cache
    import datasets

    datasets.Dataset.save_to_disk = lambda self, path, **kw: disk_full(path)
elif fault in ("hub_refused", "upload_fails"):
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refused(self, repo_id, **kw):
        request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError("401 Client Error", response=httpx.Response(401, request=request))

    def upload_fails(self, **kw):
        raise httpx.ConnectError("[Errno 101] Network is unreachable")

    if fault == "hub_refused":
        HfApi.create_repo = refused
    else:
        HfApi.create_repo = lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}"
        HfApi.upload_folder = upload_fails

from orpo_dist.cli import main  # noqa: E402 - after the fault is planted

sys.exit(main())

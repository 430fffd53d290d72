"""Log hygiene: our lines carry `[orpo_dist]`, other libraries' lines keep their own names, and the known
offline / CPU notices that tell a user nothing are dropped at start."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, launch_env

SCRIPT = r"""
import logging, sys
from orpo_dist.console import setup_logging
setup_logging()
setup_logging()  # idempotent: still one line per message
logging.getLogger("orpo_dist").info("ours")
logging.getLogger("orpo_dist.sub").info("ours too")
logging.getLogger("some.library").warning("theirs")
logging.getLogger("some.library").info("their chatter")
logging.getLogger("kernels._internals.hf_hub").warning(
    "Skipping publisher trust check for 'kernels-community/x' because Hugging Face Hub is in offline mode.")
logging.getLogger("kernels._internals.hf_hub").warning("a kernels warning that matters")
# DeepSpeed's own logger, made as deepspeed.utils.logging makes it (own handler, no propagation)
ds = logging.getLogger("DeepSpeed"); ds.propagate = False; ds.setLevel(logging.INFO)
handler = logging.StreamHandler(sys.stderr); handler.setFormatter(logging.Formatter("[DS] %(message)s"))
ds.addHandler(handler)
ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
ds.warning("a DeepSpeed warning that matters")
"""


def test_third_party_lines_keep_their_names_and_known_noise_is_dropped():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "[orpo_dist] ours",
        "[orpo_dist] ours too",
        "some.library: WARNING: theirs",
        "kernels._internals.hf_hub: WARNING: a kernels warning that matters",
        "[DS] a DeepSpeed warning that matters",
    ], proc.stderr


@pytest.mark.slow
def test_real_deepspeed_import_on_cpu_says_nothing_about_the_accelerator():
    script = "from orpo_dist.console import setup_logging; setup_logging(); import deepspeed; deepspeed.get_accelerator()"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    assert "[orpo_dist]" not in proc.stdout + proc.stderr  # nothing of theirs under our name

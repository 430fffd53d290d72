"""Help and logs that help: `--help` describes every key, docs/options.md's table is the same source, `--version`,
the start log says what was built, and the progress bar shows loss and accuracy from the first step."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, launch_env, tiny_run

import orpo_dist
import orpo_dist.trainer
from orpo_dist.config import LEAVES, load_config
from orpo_dist.config.keys import keys, other_keys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orpo_dist.train", *args], env=launch_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_help_lists_every_key_with_default_choices_aliases_and_description():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    described = keys()
    assert {k.name for k in described} == set(LEAVES)
    for k in described:
        assert k.doc, f"{k.name} has no docstring in config/schema.py"
        assert f"--{k.name}  default: {k.default}" in text, k.name
        assert k.doc in text, k.name
        if k.choices:
            assert "{" + ",".join(k.choices) + "}" in text, k.name
        for alias in k.aliases:
            assert f"--{alias}" in text, (k.name, alias)
    for name, doc in other_keys():  # trainer, train, rl, adapter, datasets, token
        assert f"--{name}\n      {doc}" in text
    # the defaults shown are the defaults a run gets
    cfg = load_config()
    assert [k.default for k in described] == [getattr(getattr(cfg, k.section), k.name) for k in described]


def test_readme_key_table_is_generated_from_the_config():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "options_doc.py"), "--check"], env=launch_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, "docs/options.md key table is stale: run python scripts/options_doc.py"


def test_version_prints_the_package_and_its_libraries():
    proc = _cli("--version")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"orpo_dist {orpo_dist.__version__} (python 3.")
    for lib in ("torch", "transformers", "trl", "accelerate", "peft", "deepspeed", "bitsandbytes"):
        assert f"{lib} " in line


def test_start_log_says_what_was_built_and_the_bar_shows_loss_from_step_1(tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    postfix_at = {}

    class Bar(orpo_dist.trainer.tqdm):
        def update(self, n=1):
            postfix_at[self.n + n] = self.postfix
            return super().update(n)

    monkeypatch.setattr(orpo_dist.trainer, "tqdm", Bar)
    orpo_dist.train(tiny_run(tmp_path, peft=True, quantization="int4", layout="packed", optim="adafactor",
                             max_steps=3, save_steps=None, logging_steps=100))  # fmt: skip
    log = capsys.readouterr().out
    built = next(line for line in log.splitlines() if "built: LlamaForCausalLM (llama)" in line)
    # read back from the model: 14 nf4 linear layers (2 layers x 7 projections), what bitsandbytes really built
    assert "weights float32 (LoRA adapters float32)" in built
    assert "quantisation 4-bit nf4 in 14 linear layers (bitsandbytes, double quantisation True" in built
    assert "attention sdpa" in built
    assert (
        "LoRA r=4 alpha=8 dropout=0.0 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj: "
        in log
    )
    assert "layout packed; optimizer adafactor (transformers Adafactor, lr 0.003" in log
    # logging_steps=100: the first logged row is the last step, yet the bar had loss and accuracy from step 1
    assert set(postfix_at) == {1, 2, 3}
    assert all("loss=" in postfix_at[s] and "accuracy=" in postfix_at[s] for s in (1, 2, 3)), postfix_at

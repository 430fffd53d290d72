"""docs/migrating.md's diffs are the lines the tests run: each `-` line is the other tool's, each `+` line
is what tests/test_dropin.py, test_autotrain.py and test_pasted_configs.py execute (the config files
themselves load here through the command line's own parser)."""

from __future__ import annotations

import re
import shlex

from helpers import REPO
from test_autotrain import AUTOTRAIN
from test_dropin import AUTOTRAIN_IMPORTS, OURS_IMPORT, TRL_IMPORT

from orpo_dist.cli import parse
from orpo_dist.config import load_config

DOC = REPO / "docs" / "migrating.md"
PASTED = REPO / "tests" / "configs" / "pasted"


def _diffs() -> list[tuple[list[str], list[str]]]:
    blocks = re.findall(r"```diff\n(.*?)```", DOC.read_text(), flags=re.S)
    return [([x[1:] for x in b.splitlines() if x.startswith("-")], [x[1:] for x in b.splitlines() if x.startswith("+")])
            for b in blocks]  # fmt: skip


def test_every_migration_diff_is_one_the_tests_run(monkeypatch):
    diffs = _diffs()
    assert len(diffs) == 7
    (trl, at_cli, at_yaml, at_py, axolotl, llamafactory, unsloth) = diffs
    assert trl == ([TRL_IMPORT], [OURS_IMPORT])
    assert at_py == (["from autotrain.params import LLMTrainingParams", "from autotrain.project import AutoTrainProject"],
                     [AUTOTRAIN_IMPORTS])  # fmt: skip
    # the AutoTrain command: the flags the test runs, after `python -m orpo_dist.train`
    shown = at_cli[1][0].removeprefix("python -m orpo_dist.train ").removesuffix(" ...")
    assert AUTOTRAIN.format(model="Qwen/Qwen2.5-1.5B-Instruct", data="data/").startswith(shown)
    assert at_cli[0][0].removeprefix("autotrain llm ") == at_cli[1][0].removeprefix(
        "python -m orpo_dist.train "
    )
    # the config-file diffs: the `+` command line parses the pasted file as the CLI does
    monkeypatch.setenv("HF_USERNAME", "someone")
    for (_, plus), file in ((at_yaml, "autotrain_orpo.yaml"), (axolotl, "axolotl_orpo.yaml"),
                            (llamafactory, "llamafactory_orpo.yaml")):  # fmt: skip
        argv = shlex.split(plus[0].split("-m orpo_dist.train", 1)[1])
        name = argv[argv.index("--config") + 1]
        argv[argv.index("--config") + 1] = str(PASTED / file)
        cfg, preset = parse(argv)
        assert not preset and cfg == load_config(PASTED / file), name
    # Unsloth: the template name is a key value
    assert unsloth[1] == ["chat_template: llama-3.1"]
    assert load_config(None, {"chat_template": "llama-3.1"}).data.chat_template == "llama-3.1"


def test_the_readme_shows_the_same_trl_diff():
    blocks = re.findall(r"```diff\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    lines = blocks[0].splitlines()
    assert lines == [f"-{TRL_IMPORT}", f"+{OURS_IMPORT}"]

"""What a model writes: `python -m orpo_dist.generate` / `orpo-dist generate` / `orpo_dist.generate()` on
every kind of model directory a run leaves (full and LoRA final/, checkpoint-N/, an exported merged model,
a plain model dir), prompts rendered with the same ids as training, and every user mistake (one line,
exit 2). Samples during training (samples.jsonl, the case-rule score) and that they never change the
training numbers."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    ACCEL,
    REPO,
    TINY_YAML,
    accelerate_cmd,
    conversations_jsonl,
    launch_env,
    read_jsonl,
    run_process,
    tiny_run,
)

import orpo_dist
from orpo_dist import cli, generation
from orpo_dist.metrics import WALL_CLOCK_KEYS

PROMPTS = ["Write in capitals: cat\n", "Write in small letters: HORSES\n", "Write in capitals: zebra\n"]
EVAL = dict(eval_split=0.2, eval_on_start=True, eval_steps=4, max_samples=60)
GENERATION_KEYS = {"eval_generation/rule_followed", "eval_generation/exact"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("gen") / "full"
    orpo_dist.train(tiny_run(out, model=str(tiny_model_dir), max_steps=8, **EVAL))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("gen") / "lora"
    orpo_dist.train(tiny_run(out, model=str(tiny_model_dir), peft=True, lr=3e-2, max_steps=8, eval_split=0))
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = generation.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def completions(stdout: str) -> list[str]:
    return [json.loads(line)["completion"] for line in stdout.splitlines()]


# ------------------------------------------------------------------------------------------ the command


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_full_final_output_dir_and_checkpoint_give_the_api_output(full_run, capsys):
    want = orpo_dist.generate(full_run / "final", PROMPTS, max_new_tokens=12)
    assert len(want) == 3 and all(isinstance(c, str) for c in want)
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", PROMPTS[2], "--max-new-tokens", "12"]
    for model in (full_run / "final", full_run):  # an output_dir means its final/
        rc, out, err = run_cli(capsys, model, *args, "--json")
        assert rc == 0, err
        assert completions(out) == want
        assert [json.loads(line)["prompt"] for line in out.splitlines()] == PROMPTS
    # checkpoint-4 is an earlier model: it loads (its model/), and matches the weights saved in it
    rc, out, err = run_cli(capsys, full_run / "checkpoint-4", *args, "--json")
    assert rc == 0, err
    assert completions(out) == orpo_dist.generate(
        full_run / "checkpoint-4" / "model", PROMPTS, max_new_tokens=12
    )
    # the plain-text form: prompt -> completion, one line each
    rc, out, _ = run_cli(capsys, full_run / "final", *args)
    assert out.splitlines() == [f"{p.rstrip()!r} -> {c!r}" for p, c in zip(PROMPTS, want)]


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_the_entry_point_runs_generate(full_run, capsys):
    rc = cli.main(
        ["generate", str(full_run / "final"), "--prompt", PROMPTS[0], "--json", "--max-new-tokens", "5"]
    )
    assert rc == 0
    assert completions(capsys.readouterr().out) == orpo_dist.generate(
        full_run / "final", PROMPTS[:1], max_new_tokens=5
    )


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(full_run):
    prompts = PROMPTS + ["Write in small letters: A\n", "Write in capitals: abcdefgh\n"]
    batched = orpo_dist.generate(full_run / "final", prompts, max_new_tokens=10, batch_size=8)
    alone = orpo_dist.generate(full_run / "final", prompts, max_new_tokens=10, batch_size=1)
    assert batched == alone


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_complete_is_greedy_decoding_of_the_model(full_run):
    """The completion is the argmax continuation, computed here with plain forward passes."""
    import torch

    model, tokenizer, chat, max_prompt = generation.load(full_run / "final", generation.Options())
    ids = generation.encode(tokenizer, PROMPTS[:1], chat, max_prompt)[0]
    (got,) = generation.complete(model, tokenizer, [ids], max_new_tokens=6)
    seq, want = list(ids), []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            want.append(nxt)
            seq.append(nxt)
    assert got == want


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_sampling_is_seeded_and_returns_n_per_prompt(full_run):
    kw = dict(max_new_tokens=8, temperature=1.5, top_p=0.95, num_return_sequences=3)
    first = orpo_dist.generate(full_run / "final", PROMPTS[:2], seed=1, **kw)
    assert len(first) == 6
    assert orpo_dist.generate(full_run / "final", PROMPTS[:2], seed=1, **kw) == first


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_lora_final_equals_the_merged_model_greedy(lora_run, tmp_path, capsys):
    from orpo_dist.export import merge_to_16bit

    assert (lora_run / "final" / "adapter_config.json").is_file()
    merged = merge_to_16bit(lora_run / "final", tmp_path / "merged", dtype="float32")
    assert (merged / "prompt_format.json").is_file()  # the export carries how prompts are rendered
    lora = orpo_dist.generate(lora_run / "final", PROMPTS, max_new_tokens=12)
    assert orpo_dist.generate(merged, PROMPTS, max_new_tokens=12) == lora
    # the adapter is applied: the base alone scores the prompts differently
    import torch

    base_dir = json.loads((lora_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tok, chat, _ = generation.load(lora_run / "final", generation.Options())
    base, *_ = generation.load(base_dir, generation.Options())
    ids = torch.tensor(generation.encode(tok, PROMPTS[:1], chat))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
    rc, out, err = run_cli(capsys, lora_run / "checkpoint-4", "--prompt", PROMPTS[0], "--json")
    assert rc == 0, err
    assert len(completions(out)) == 1


def test_plain_model_dir_and_prompt_format_choice(tiny_model_dir, tokenizer):
    """A model no run made: no record, so a tokenizer with a chat template renders through it."""
    model, tok, chat, max_prompt = generation.load(tiny_model_dir, generation.Options())
    assert chat is True and max_prompt is None
    _, _, chat, _ = generation.load(tiny_model_dir, generation.Options(prompt_format="text"))
    assert chat is False
    assert len(orpo_dist.generate(tiny_model_dir, ["hi"], max_new_tokens=3)) == 1


# ------------------------------------------------------------------------ prompts rendered as in training


def _training_prompt_ids(run: Path, tokenizer) -> dict[str, list[int]]:
    """The tokenised held-in pairs training used: prompt text (decoded, BOS dropped) -> its ids."""
    from orpo_dist.config import load_config
    from orpo_dist.data import build_datasets

    cfg = load_config(run / "config.yaml", [])
    train, _, _ = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    return {tokenizer.decode(r["prompt_ids"], skip_special_tokens=True): r["prompt_ids"] for r in train}


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_text_run_prompt_ids_equal_training(full_run):
    model, tok, chat, max_prompt = generation.load(full_run / "final", generation.Options())
    assert chat is False  # text rows: the builtin tokenizer's chat template was not applied in training
    assert json.loads((full_run / "final" / "prompt_format.json").read_text())["prompts"] == "text"
    trained = _training_prompt_ids(full_run, tok)
    texts = list(trained)[:5]
    assert generation.encode(tok, texts, chat, max_prompt) == [trained[t] for t in texts]


@pytest.mark.slow  # trains one step
@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_chat_run_prompt_ids_equal_training(tmp_path, tiny_model_dir, template):
    data = conversations_jsonl(tmp_path / "chat.jsonl", n=12)
    out = tmp_path / "run"
    orpo_dist.train(tiny_run(out, model=str(tiny_model_dir), data_path=str(data), chat_template=template,
                             max_steps=1, save_steps=None))  # fmt: skip
    model, tok, chat, max_prompt = generation.load(out / "final", generation.Options())
    assert chat is True
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    user = [r["chosen"][:1] for r in rows]  # the prompt is the shared user message
    from orpo_dist.config import load_config
    from orpo_dist.data import build_datasets

    cfg = load_config(out / "config.yaml", [])
    train, _, _ = build_datasets(cfg.data, tok, cfg.train.seed)
    want = {r["id"]: r["prompt_ids"] for r in train}
    got_messages = generation.encode(tok, user, chat, max_prompt)
    got_text = generation.encode(tok, [m[0]["content"] for m in user], chat, max_prompt)
    for i, ids in want.items():
        assert got_messages[i] == ids
        assert got_text[i] == ids  # a text prompt is the user's message of a chat run


# ------------------------------------------------------------------------------------------ user mistakes


def _one_line_exit_2(rc: int, out: str, err: str, *words: str) -> None:
    assert rc == 2 and not out, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orpo_dist: "), err
    for word in words:
        assert word in lines[0], (word, err)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
        (["--max-new-tokens", "many"], ["--max-new-tokens", "many"]),
        (["--temperature", "-1"], ["--temperature -1.0"]),
        (["--top-p", "1.5", "--temperature", "1"], ["--top-p 1.5"]),
        (["--top-p", "0.9"], ["--top-p 0.9", "--temperature"]),
        (["--num-return-sequences", "3"], ["--num-return-sequences 3", "sampling"]),
        (["--num-return-sequences", "0", "--temperature", "1"], ["--num-return-sequences 0"]),
        (["--batch-size", "0"], ["--batch-size 0"]),
        (["--prompt-format", "jinja"], ["--prompt-format", "jinja"]),
        (["--dtype", "int4"], ["--dtype", "int4"]),
        (["--max-new-token", "4"], ["unrecognized", "--max-new-token"]),
        (["--prompt", "   "], ["empty"]),
    ],
)
def test_bad_flag_values(tiny_model_dir, capsys, flags, words):
    argv = [tiny_model_dir, *flags] + ([] if "--prompt" in flags else ["--prompt", "hi"])
    _one_line_exit_2(*run_cli(capsys, *argv), *words)


def test_missing_model_and_not_a_model(tmp_path, capsys):
    _one_line_exit_2(*run_cli(capsys, tmp_path / "nowhere", "--prompt", "hi"), "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(*run_cli(capsys, tmp_path / "empty", "--prompt", "hi"), "not a checkpoint")


def test_adapter_whose_base_is_missing(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, task_type="CAUSAL_LM")
    )
    model.save_pretrained(adapter)
    PreTrainedTokenizerFast.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _one_line_exit_2(*run_cli(capsys, adapter, "--prompt", "hi"), "deleted-base", "--base-model")
    config["base_model_name_or_path"] = "no-such-org/no-such-model"  # a hub id, offline
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _one_line_exit_2(*run_cli(capsys, adapter, "--prompt", "hi"), "no-such-org/no-such-model")
    # --base-model points it at the base: then it runs
    rc, out, err = run_cli(capsys, adapter, "--prompt", "hi", "--base-model", tiny_model_dir, "--json")
    assert rc == 0, err
    assert len(completions(out)) == 1


def test_prompts_file_mistakes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    final = tiny_model_dir
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    _one_line_exit_2(*run_cli(capsys, final, "--prompts-file", empty), "empty")
    _one_line_exit_2(*run_cli(capsys, final, "--prompts-file", tmp_path / "absent.jsonl"), "no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    _one_line_exit_2(*run_cli(capsys, final, "--prompts-file", bad), "line 2", "not JSON")
    bad.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    _one_line_exit_2(*run_cli(capsys, final, "--prompts-file", bad), "line 2", "`prompt` or `messages`")
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    _one_line_exit_2(*run_cli(capsys, final, "--prompts-file", bad), "line 1", "{role, content}")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    _one_line_exit_2(*run_cli(capsys, final), "stdin", "empty")


def test_python_api_raises_generate_error(tiny_model_dir, tmp_path):
    with pytest.raises(generation.GenerateError, match="does not exist"):
        orpo_dist.generate(tmp_path / "nowhere", ["hi"])
    with pytest.raises(generation.GenerateError, match="no prompts"):
        orpo_dist.generate(tiny_model_dir, [])
    with pytest.raises(generation.GenerateError, match="max-new-tokens 0"):
        orpo_dist.generate(tiny_model_dir, ["hi"], max_new_tokens=0)


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_prompts_file_jsonl_text_lines_and_stdin(full_run, tmp_path, capsys, monkeypatch):
    final = full_run / "final"
    want = orpo_dist.generate(final, PROMPTS, max_new_tokens=8)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    rc, out, err = run_cli(capsys, final, "--prompts-file", jsonl, "--json", "--max-new-tokens", "8")
    assert rc == 0, err
    assert completions(out) == want
    text = tmp_path / "p.txt"
    text.write_text("Write in capitals: cat\nWrite in small letters: HORSES\n")
    rc, out, err = run_cli(capsys, final, "--prompts-file", text, "--json", "--max-new-tokens", "8")
    assert rc == 0, err
    assert completions(out) == orpo_dist.generate(final, ["Write in capitals: cat", "Write in small letters: HORSES"],
                                                  max_new_tokens=8)  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO(jsonl.read_text()))
    rc, out, err = run_cli(capsys, final, "--json", "--max-new-tokens", "8")
    assert rc == 0, err
    assert completions(out) == want


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        generation.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("--max-new-tokens MAX_NEW_TOKENS", "(default: 128)", "(default: 0.0)", "(default: 1.0)",
                    "(default: auto)", "--prompts-file", "--json", "--num-return-sequences"):  # fmt: skip
        assert default in text, default


@pytest.mark.slow
def test_the_module_runs_as_a_command_reading_stdin(full_run, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "orpo_dist.generate",
        str(full_run / "final"),
        "--json",
        "--max-new-tokens",
        "8",
    ]
    env = launch_env()
    proc = subprocess.run(cmd, input="".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert completions(proc.stdout) == orpo_dist.generate(full_run / "final", PROMPTS, max_new_tokens=8)
    proc = subprocess.run([*cmd[:3], str(tmp_path / "absent"), "--prompt", "x"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("orpo_dist: ") and "absent" in proc.stderr
    assert REPO.is_dir()


# ------------------------------------------------------------------------------------------ samples in training


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_samples_written_at_every_eval_with_the_rule_score(full_run):
    rows = read_jsonl(full_run / "samples.jsonl")
    evals = [r for r in read_jsonl(full_run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert sorted({r["step"] for r in rows}) == [0, 4, 8]
    assert all(sum(r["step"] == s for r in rows) == 4 for s in (0, 4, 8))  # 4 samples (the default) each
    assert set(rows[0]) == {"step", "prompt", "completion", "chosen", "rejected"}
    first = [r["prompt"] for r in rows if r["step"] == 0]
    assert first == [r["prompt"] for r in rows if r["step"] == 8]  # the same prompts at every eval
    assert all(r["prompt"].startswith("Write in ") for r in rows)
    for r in evals:
        assert GENERATION_KEYS <= set(r) and 0 <= r["eval_generation/rule_followed"] <= 1
        assert "eval_sample_seconds" in r and "eval_sample_seconds" in WALL_CLOCK_KEYS
    report = (full_run / "report.md").read_text()
    assert "before (step 0)" in report and "after (step 8)" in report and first[0].strip() in report


def test_the_case_rule_check():
    from orpo_dist.builtin import builtin_check, case_rule_check

    assert builtin_check("builtin:case_rule") is case_rule_check and builtin_check("data.jsonl") is None
    assert case_rule_check("Write in capitals: cat\n", "CAT") == (True, True)
    assert case_rule_check("Write in capitals: cat\n", " GW ") == (True, False)
    assert case_rule_check("Write in capitals: cat\n", "Cat") == (False, False)
    assert case_rule_check("Write in small letters: HTZ\n", "htz") == (True, True)
    assert case_rule_check("Write in small letters: HTZ\n", "") == (False, False)
    assert case_rule_check("Write in small letters: HTZ\n", "12") == (False, False)
    assert case_rule_check("Say hello", "hello") is None


def _numbers(rows: list[dict]) -> list[dict]:
    drop = WALL_CLOCK_KEYS | GENERATION_KEYS
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.slow
def test_samples_never_change_the_training_numbers(full_run, tmp_path, tiny_model_dir):
    """The same run with samples off: metrics.jsonl equal to its 6 decimals (wall-clock keys aside)."""
    off = tmp_path / "off"
    orpo_dist.train(tiny_run(off, model=str(tiny_model_dir), max_steps=8, sample_prompts=0, **EVAL))
    assert not (off / "samples.jsonl").exists()
    on_rows, off_rows = read_jsonl(full_run / "metrics.jsonl"), read_jsonl(off / "metrics.jsonl")
    assert not any(GENERATION_KEYS & set(r) for r in off_rows)
    assert _numbers(on_rows) == _numbers(off_rows)


# ------------------------------------------------------------------------- samples under 2-rank DDP and ZeRO-3

# as tests/test_multiprocess.py launches them: DDP needs ACCELERATE_USE_CPU, DeepSpeed must not have it
STRATEGIES = {
    "ddp": (["--config_file", str(ACCEL / "multi_gpu.yaml")], {"ACCELERATE_USE_CPU": "true"}, "MULTI_CPU"),
    "zero3": (["--config_file", str(ACCEL / "zero3.yaml")], {}, "DEEPSPEED"),
}


def _launch(tmp: Path, strategy: str, model_dir: Path, samples: int) -> tuple[Path, str]:
    args, strategy_env, distributed = STRATEGIES[strategy]
    out, trace = tmp / f"{strategy}-{samples}", tmp / f"trace-{strategy}-{samples}"
    trace.mkdir(parents=True)
    cmd = [*accelerate_cmd(2, *args), "-m", "orpo_dist.train",
           "--config", str(TINY_YAML), "--model", str(model_dir), "--output_dir", str(out), "--eval_split", "0.2",
           "--eval_on_start", "true", "--eval_steps", "4", "--max_samples", "40", "--sample_prompts", str(samples)]  # fmt: skip
    rc, log = run_process(
        cmd, launch_env(ORPO_DIST_TRACE_DIR=str(trace), **strategy_env), cwd=tmp, timeout=600
    )
    assert rc == 0, log[-6000:]
    # a real 2-rank run: each CPU launch spelling that silently runs one process would fail here
    assert log.count(f"world_size=2 distributed={distributed} ") == 1, log[-4000:]
    ranks = [row for f in trace.glob("rank*.jsonl") for row in read_jsonl(f)]
    assert {r["rank"] for r in ranks} == {0, 1} and {r["world_size"] for r in ranks} == {2}
    return out, log


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_ranks_rank0_writes_samples_no_hang_numbers_unchanged(tmp_path, tiny_model_dir, strategy):
    on, log = _launch(tmp_path, strategy, tiny_model_dir, samples=3)
    rows = read_jsonl(on / "samples.jsonl")
    # every eval (before, step 4, the end) once: 3 rows each, not one set per rank
    assert [r["step"] for r in rows] == [0] * 3 + [4] * 3 + [8] * 3
    assert len(re.findall(r"3 samples \+ \d+ scored prompts generated in", log)) == 3  # rank 0 alone reports
    evals = [r for r in read_jsonl(on / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and all(GENERATION_KEYS <= set(r) for r in evals)
    off, _ = _launch(tmp_path, strategy, tiny_model_dir, samples=0)
    assert not (off / "samples.jsonl").exists()
    assert _numbers(read_jsonl(on / "metrics.jsonl")) == _numbers(read_jsonl(off / "metrics.jsonl"))


def test_samples_restore_train_mode_checkpointing_cache_and_rng(tmp_path, tiny_model_dir, tokenizer):
    """What generating during training touches is put back: train mode, gradient checkpointing, the
    config's use_cache, and every random state the training draws from."""
    import random

    import datasets
    import torch
    from accelerate import Accelerator
    from helpers import tokenized_pair
    from transformers import AutoModelForCausalLM

    from orpo_dist.config import load_config
    from orpo_dist.samples import Samples

    pairs = [
        tokenized_pair(tokenizer, p, p.split(": ")[1].strip().upper(), "x", i) for i, p in enumerate(PROMPTS)
    ]
    cfg = load_config(None, {"output_dir": str(tmp_path), "sample_prompts": 2, "seed": 3})
    samples = Samples(cfg, datasets.Dataset.from_list(pairs), tokenizer, Accelerator(cpu=True))
    assert len(samples.pairs) == 2 and len(samples.scored) == 3  # 2 drawn samples; every pair scored
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    metrics = samples(model, step=0)
    assert model.training and model.is_gradient_checkpointing and model.config.use_cache is False
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert set(metrics) == {"eval_sample_seconds", *GENERATION_KEYS}
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert [r["step"] for r in rows] == [0, 0] and {r["prompt"] for r in rows} <= set(PROMPTS)
    # the same seed draws the same prompts; sample_prompts 0 draws none and generates nothing
    again = Samples(cfg, datasets.Dataset.from_list(pairs), tokenizer, Accelerator(cpu=True))
    assert [p["prompt"] for p in again.pairs] == [p["prompt"] for p in samples.pairs]
    cfg.train.sample_prompts = 0
    off = Samples(cfg, datasets.Dataset.from_list(pairs), tokenizer, Accelerator(cpu=True))
    assert not off.enabled and off(model, step=1) == {}


def test_a_resumed_run_keeps_the_samples_up_to_its_checkpoint(tmp_path, tokenizer):
    """As metrics.jsonl: a resume keeps the rows up to its step (the rest is generated again), a fresh
    start moves an earlier run's samples.jsonl aside."""
    import datasets
    from accelerate import Accelerator
    from helpers import tokenized_pair

    from orpo_dist.config import load_config
    from orpo_dist.samples import Samples

    pairs = datasets.Dataset.from_list(
        [tokenized_pair(tokenizer, p, "X", "x", i) for i, p in enumerate(PROMPTS)]
    )
    cfg = load_config(None, {"output_dir": str(tmp_path), "sample_prompts": 1})
    path = tmp_path / "samples.jsonl"
    lines = [json.dumps({"step": s, "prompt": "p", "completion": "c"}) for s in (0, 2, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "pro')  # the last line torn by a kill
    Samples(cfg, pairs, tokenizer, Accelerator(cpu=True)).start(resumed_step=2)
    assert [r["step"] for r in read_jsonl(path)] == [0, 2]
    Samples(cfg, pairs, tokenizer, Accelerator(cpu=True)).start(resumed_step=None)
    assert not path.exists() and [r["step"] for r in read_jsonl(tmp_path / "samples.previous.jsonl")] == [
        0,
        2,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"peft": True}, {"peft": True, "quantization": "int4"}, {"gradient_checkpointing": True}],
                         ids=["lora", "qlora", "gradient_checkpointing"])  # fmt: skip
def test_samples_with_lora_qlora_and_gradient_checkpointing(tmp_path, tiny_model_dir, extra):
    run = tiny_run(
        tmp_path, model=str(tiny_model_dir), max_steps=4, save_steps=None, **{**EVAL, "eval_steps": 2}
    )
    result = orpo_dist.train({**run, **extra})
    evals = [r for r in result.metrics if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(GENERATION_KEYS <= set(r) for r in evals)
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [0] * 4 + [2] * 4 + [4] * 4

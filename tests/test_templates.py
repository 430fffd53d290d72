"""Chat templates (`chat_template`): applied to conversational rows, shown at start with the prompt /
completion boundary, saved with the tokenizer into checkpoints, final/ and the export; a base model
without a template stops before training naming `chat_template`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_YAML, assert_one_error_line, conversations_jsonl, launch_env

from orpo_dist.builtin import build_tokenizer
from orpo_dist.config import ConfigError, load_config
from orpo_dist.data import build_datasets
from orpo_dist.templates import CHATML, set_chat_template


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orpo_dist.train", "--config", str(TINY_YAML), *args]
    return subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_chatml_is_applied_shown_and_saved_everywhere(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    data, out = conversations_jsonl(tmp_path / "conv.jsonl"), tmp_path / "run"
    proc = _train("--model", str(tiny_model_dir), "--data_path", str(data), "--chat_template", "chatml",
                  "--max_length", "160", "--max_prompt_length", "128", "--max_steps", "3", "--save_steps", "2",
                  "--export", "merged_16bit", "--output_dir", str(out), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    assert "chat_template: chatml (applied); training pair" in log
    # one rendered pair, the completion marked where it starts (the chosen/rejected first user turn is the prompt)
    line = next(x for x in log.splitlines() if "  chosen:" in x)
    assert "<|im_start|>user\\nWrite in " in line
    assert (
        line.endswith("<|im_start|>assistant\\n▶" + line.split("▶")[1]) and "<|im_end|>" in line.split("▶")[1]
    )
    assert "<|im_start|>, <|im_end|> are not tokens of this tokenizer" in log  # said, not hidden
    messages = [{"role": "user", "content": "Write in capitals: dog"}]
    for saved in (out / "checkpoint-2" / "model", out / "final", out / "export" / "merged"):
        assert (saved / "chat_template.jinja").read_text() == CHATML, saved
        rendered = AutoTokenizer.from_pretrained(saved).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert rendered == "<|im_start|>user\nWrite in capitals: dog<|im_end|>\n<|im_start|>assistant\n", (
            saved
        )


@pytest.mark.slow
def test_base_model_without_a_template_stops_naming_chat_template(tmp_path, tiny_model_dir):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    (base / "chat_template.jinja").unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    data = conversations_jsonl(tmp_path / "conv.jsonl")
    proc = _train(
        "--model", str(base), "--data_path", str(data), "--output_dir", str(tmp_path / "o"), cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert_one_error_line(proc.stderr, "no chat template", "set chat_template: chatml")
    assert "model backend" not in proc.stdout and not (tmp_path / "o" / "final").exists()  # before the model


JINJA = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"  # fmt: skip


@pytest.mark.parametrize(
    "setting,prompt_start,prompt_end,chosen",
    [
        ("zephyr", "<s><|user|>\nWrite in", "</s><|assistant|>\n", "</s>"),
        ("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nWrite in",
         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|></s>"),
        (None, "<s>Write in", "\n", "\n</s>"),  # none: plain text, one line per message
        ("file", "<s>[user] Write in", "\n[assistant] ", "\n</s>"),
    ],
)  # fmt: skip
def test_each_template_renders_the_pair_with_one_bos(setting, prompt_start, prompt_end, chosen, tmp_path):
    if setting == "file":
        setting = str(tmp_path / "my_template.jinja")
        Path(setting).write_text(JINJA)
    cfg = load_config(
        None, {"data_path": str(conversations_jsonl(tmp_path / "c.jsonl", 8)), "chat_template": setting}
    )
    assert cfg.data.chat_template == setting
    tokenizer = build_tokenizer()
    set_chat_template(tokenizer, cfg.data.chat_template)
    train, _, report = build_datasets(cfg.data, tokenizer, seed=0)
    assert report.format == "conversational, implicit prompt"
    pair = train[0]
    prompt = tokenizer.decode(pair["prompt_ids"], skip_special_tokens=False)
    completion = tokenizer.decode(pair["chosen_ids"], skip_special_tokens=False)
    assert prompt.startswith(prompt_start) and not prompt.startswith("<s><s>"), prompt
    assert prompt.endswith(prompt_end), prompt
    assert completion.endswith(chosen) and completion[: -len(chosen)].isalpha(), completion


@pytest.mark.parametrize("value,stored", [("ChatML", "chatml"), ("none", None), ("None", None), ("tokenizer_default", "tokenizer")])  # fmt: skip
def test_chat_template_spellings(value, stored):
    assert load_config(None, {"chat_template": value}).data.chat_template == stored


def test_unknown_chat_template_is_a_config_error():
    with pytest.raises(ConfigError, match="chat_template='falcon' is not one of"):
        load_config(None, {"chat_template": "falcon"})


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_HEAD = "Below are some instructions that describe some tasks. Write responses that appropriately complete each request."
VICUNA_HEAD = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions.")  # fmt: skip
LLAMA3_TURNS = ("<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")  # fmt: skip
# Unsloth's template names: (with the system message, without it), rendered by the tiny tokenizer (<s> / </s>)
UNSLOTH_NAMES = {
    "llama-3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" + LLAMA3_TURNS,
                "<s>" + LLAMA3_TURNS),
    "llama-3.1": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" + LLAMA3_TURNS,
                  "<s>" + LLAMA3_TURNS),
    "qwen-2.5": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                 "<|im_start|>assistant\nHello.<|im_end|>\n",
                 f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                 "<|im_start|>assistant\nHello.<|im_end|>\n"),
    "gemma": ("<s><start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n",
              "<s><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"),
    "mistral": ("<s>[INST] Be brief.\n\nHi? [/INST]Hello.</s>", "<s>[INST] Hi? [/INST]Hello.</s>"),
    "phi-3": ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n",
              "<|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n"),
    "alpaca": ("<s>Be brief.\n\n### Instruction:\nHi?\n\n### Response:\nHello.</s>\n\n",
               f"<s>{ALPACA_HEAD}\n\n### Instruction:\nHi?\n\n### Response:\nHello.</s>\n\n"),
    "vicuna": ("<s>Be brief. USER: Hi? ASSISTANT: Hello.</s>", f"<s>{VICUNA_HEAD} USER: Hi? ASSISTANT: Hello.</s>"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(UNSLOTH_NAMES))
def test_unsloth_template_names_render_the_exact_format(name):
    tokenizer = build_tokenizer()
    cfg = load_config(None, {"chat_template": name})  # the name is accepted (llama-3 is our llama3)
    set_chat_template(tokenizer, cfg.data.chat_template, say=lambda m: None)
    with_system, without = UNSLOTH_NAMES[name]
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == with_system
    assert tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False) == without
    # the prompt with the generation prompt is a prefix of the whole: the completion boundary is exact
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert with_system.startswith(prompt) and with_system[len(prompt):].lstrip().startswith("Hello.")

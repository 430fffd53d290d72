"""Chat templates: the tokenizer's own, a named one (chatml, zephyr, llama3 and Unsloth's names), plain text,
or a .jinja file.

`chat_template` is set on the tokenizer once, before any row is rendered, so the same template renders
the training pairs (data/rows.py, through `trl.data_utils`) and is saved with the tokenizer into every
checkpoint's `model/`, `final/` and the export (`chat_template.jinja`): the trained model chats with the
template it learned. How the run's prompts were rendered (chat template or plain text) is saved beside it
(`prompt_format.json`), so `orpo_dist.generate` renders new prompts the same way (`render_prompt`).
`example_lines` shows one tokenised training pair at start, with the prompt /
completion boundary marked, so a template mistake is seen before hours of training.
"""

from __future__ import annotations

import json
from pathlib import Path

# The formats as their models ship them (Qwen / OpenHermes ChatML, HuggingFaceH4 Zephyr, Meta Llama 3).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
PLAIN = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"  # `none`: text, one line each
# Unsloth's names (unsloth.chat_templates), as their models ship them. llama-3.1 is the Llama 3 turn format
# without Meta's dated default system message; qwen-2.5 is ChatML with Qwen 2.5's default system message.
QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}" + CHATML
)
GEMMA = (  # no system role: a system message opens the first user turn
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' + ns.system"
    " + message['content'] | trim + '<end_of_turn>\\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL = (  # a system message opens the first [INST]
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ALPACA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below are some instructions that describe some tasks. "
    "Write responses that appropriately complete each request.\n\n' }}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% else %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
VICUNA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s "
    "questions. ' }}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}{% else %}"
    "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
NAMED = {
    "chatml": CHATML, "zephyr": ZEPHYR, "llama3": LLAMA3, "llama-3.1": LLAMA3, "qwen-2.5": QWEN25,
    "gemma": GEMMA, "mistral": MISTRAL, "phi-3": PHI3, "alpaca": ALPACA, "vicuna": VICUNA,
}  # fmt: skip
MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen-2.5": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama-3.1": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi-3": ("<|user|>", "<|assistant|>", "<|end|>"),
}
BOUNDARY = "▶"  # marks where the completion starts in the logged example
PROMPT_FORMAT_FILE = "prompt_format.json"


def set_chat_template(tokenizer, setting: str | None, say=print) -> None:
    """Put the configured template on the tokenizer (`tokenizer` keeps its own; None is `none`)."""
    if setting == "tokenizer":
        return
    if setting is None:
        tokenizer.chat_template = PLAIN
    elif setting in NAMED:
        tokenizer.chat_template = NAMED[setting]
        missing = [m for m in MARKERS.get(setting, ()) if m not in tokenizer.get_vocab()]
        if missing:
            say(
                f"chat_template {setting}: {', '.join(missing)} are not tokens of this tokenizer; "
                "the model learns them as ordinary text"
            )
    else:
        tokenizer.chat_template = Path(setting).expanduser().read_text()


def _show(text: str) -> str:
    return text.replace("\n", "\\n")


def example_lines(dataset, tokenizer, setting: str | None, data_format: str, width: int = 300) -> list[str]:
    """One tokenised training pair decoded back to text, completion after ▶ (long prompts show their end)."""
    if dataset is None or len(dataset) == 0:
        return []
    pair = dataset[0]
    prompt, chosen, rejected = (
        tokenizer.decode(pair[f"{k}_ids"], skip_special_tokens=False)
        for k in ("prompt", "chosen", "rejected")
    )
    prompt = prompt if len(prompt) <= width else "…" + prompt[-width:]
    chosen, rejected = (c if len(c) <= width else c[:width] + "…" for c in (chosen, rejected))
    name = "none (plain text)" if setting is None else setting
    applied = "applied" if data_format.startswith("conversational") else "not applied: the rows are text"
    return [
        f"chat_template: {name} ({applied}); training pair {pair['id']} as the model sees it, "
        f"completion after {BOUNDARY}:",
        f"  chosen:   {_show(prompt)}{BOUNDARY}{_show(chosen)}",
        f"  rejected: …{BOUNDARY}{_show(rejected)}",
    ]


def write_prompt_format(model_dir: Path, data_format: str, setting: str | None) -> None:
    """Record beside the tokenizer how training rendered prompts: `chat` (conversations through the chat
    template) or `text` (text rows, used as they are), and the `chat_template` setting."""
    prompts = "chat" if data_format.startswith("conversational") else "text"
    record = {"prompts": prompts, "chat_template": setting, "data_format": data_format}
    (Path(model_dir) / PROMPT_FORMAT_FILE).write_text(json.dumps(record) + "\n")


def read_prompt_format(model_dir: Path) -> str | None:
    """`chat` or `text` as recorded by training; None when the directory has no (readable) record."""
    path = Path(model_dir) / PROMPT_FORMAT_FILE
    try:
        prompts = json.loads(path.read_text()).get("prompts")
    except (OSError, ValueError, AttributeError):
        return None
    return prompts if prompts in ("chat", "text") else None


def render_prompt(tokenizer, prompt: str | list[dict], chat: bool) -> str:
    """A prompt as training rendered it: messages through the chat template with the assistant's
    generation prompt (`trl.data_utils`, as data/rows.py); text as it is, or, when the run trained on
    conversations, as one user message."""
    if isinstance(prompt, str):
        if not chat:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    from trl.data_utils import maybe_apply_chat_template

    return maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]

"""A built-in preference task, tokenizer and tiny model, made locally with no download.

The task ("case rule") is one a small model can really learn, so the quickstart shows ORPO working:
the prompt asks for a word in capitals or in small letters; the chosen answer obeys, the rejected
answer uses the other case. Half the pairs ask for each case, so a model that ignores the prompt
scores about 0.5 on held-out preference accuracy; one that has learned the rule scores near 1.0.

`model: builtin:tiny` and `data_path: builtin:case_rule` select these in a config. A completion of the
task can be checked (`case_rule_check`), so training also scores what the model writes
(`eval_generation/rule_followed`, `eval_generation/exact`: samples.py).
"""

from __future__ import annotations

import random
import re
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BUILTIN_PREFIX = "builtin:"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# ChatML-like and readable; the generation prompt is the assistant marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "small": (256, 4, 4, 2, 512),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII, with BOS added and a chat template."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"[\s\S]"), behavior="isolated"
    )  # every char, newlines too
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, size: str = "tiny", **overrides) -> LlamaConfig:
    hidden, layers, heads, kv_heads, inter = MODEL_SIZES[size]
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_builtin_model(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write `builtin:<size>` as a normal HF checkpoint (safetensors + tokenizer) and return its dir.

    Training then loads it through `from_pretrained`, the same path as a hub model.
    """
    import torch

    size = name.removeprefix(BUILTIN_PREFIX)
    if size not in MODEL_SIZES:
        raise ValueError(
            f"unknown built-in model {name!r}; choose one of {[BUILTIN_PREFIX + s for s in MODEL_SIZES]}"
        )
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, size))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def case_rule_pairs(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """`n` standard-format pairs for the case rule (see module docstring)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        word = _word(rng)
        if rng.random() < 0.5:
            prompt, chosen, rejected = f"Write in capitals: {word}\n", word.upper(), word
        else:
            prompt, chosen, rejected = f"Write in small letters: {word.upper()}\n", word, word.upper()
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


CASE_PROMPT = re.compile(r"Write in (capitals|small letters): (\S+)\s*$")


def case_rule_check(prompt: str, completion: str) -> tuple[bool, bool] | None:
    """(rule followed, exact answer) for a case-rule completion; None if the prompt is not the task's.

    The rule is followed when the answer has letters and every one is in the asked case; exact when the
    answer (spaces around it ignored) is the prompt's word in that case."""
    match = CASE_PROMPT.search(prompt)
    if not match:
        return None
    capitals, word = match[1] == "capitals", match[2]
    answer = completion.strip()
    letters = [c for c in answer if c.isalpha()]
    followed = bool(letters) and all(c.isupper() if capitals else c.islower() for c in letters)
    return followed, answer == (word.upper() if capitals else word.lower())


BUILTIN_DATASETS = {"case_rule": case_rule_pairs}
# built-in tasks whose completions can be checked: name -> check(prompt, completion)
BUILTIN_CHECKS = {"case_rule": case_rule_check}


def builtin_check(data_path: str):
    """The completion check of a built-in task (`builtin:case_rule`), or None."""
    if not data_path.startswith(BUILTIN_PREFIX):
        return None
    return BUILTIN_CHECKS.get(data_path.removeprefix(BUILTIN_PREFIX))


def builtin_pairs(name: str, seed: int = 0) -> list[dict[str, str]]:
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_DATASETS:
        raise ValueError(
            f"unknown built-in dataset {name!r}; choose one of {[BUILTIN_PREFIX + k for k in BUILTIN_DATASETS]}"
        )
    return BUILTIN_DATASETS[key](seed=seed)

"""See what a model writes: batched generation from a run's model, the command and the Python API.

    python -m orpo_dist.generate outputs/quickstart --prompt $'Write in capitals: cat\\n'
    orpo-dist generate outputs/orpo/final --prompts-file prompts.jsonl --json
    echo "Hello" | python -m orpo_dist.generate outputs/orpo/checkpoint-500
    orpo_dist.generate("outputs/quickstart/final", ["Write in capitals: hello\\n"])   # -> ["HELAP"]

MODEL is a run's output_dir (its final/), final/ (full weights or a LoRA adapter, whose base comes from
adapter_config.json), a checkpoint-N/ (its model/), an exported merged model, or any model directory.
Prompts are rendered as training rendered them (templates.render_prompt, data.tokens.prompt_ids): the
run records in prompt_format.json whether its prompts went through the chat template (conversations)
or were text; a directory without that record uses its chat template if the tokenizer has one.
Decoding is greedy unless --temperature > 0. Nothing is written: completions go to stdout.
The trainer's samples (samples.py) use `complete` on the model it is training. `orpo_dist/generate.py` is
the shim behind `python -m orpo_dist.generate`; the API is the function `orpo_dist.generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT_FORMATS = ("auto", "chat", "text")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class GenerateError(ValueError):
    """A user mistake (missing model, missing base, no prompts, a bad option): one line, exit 2."""


@dataclass
class Options:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0
    batch_size: int = 16
    prompt_format: str = "auto"
    dtype: str = "auto"
    base_model: str | None = None
    device: str | None = None
    trust_remote_code: bool = False

    def check(self) -> None:
        p = []
        if self.max_new_tokens < 1:
            p.append(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            p.append(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            p.append(f"--top-p {self.top_p} must be in (0, 1]")
        elif self.top_p < 1 and self.temperature == 0:
            p.append(f"--top-p {self.top_p} needs sampling: add --temperature > 0 (greedy ignores it)")
        if self.num_return_sequences < 1:
            p.append(f"--num-return-sequences {self.num_return_sequences} must be >= 1")
        elif self.num_return_sequences > 1 and self.temperature == 0:
            p.append(
                f"--num-return-sequences {self.num_return_sequences} needs sampling: add --temperature > 0 "
                "(greedy decoding returns the same completion every time)"
            )
        if self.batch_size < 1:
            p.append(f"--batch-size {self.batch_size} must be >= 1")
        if self.prompt_format not in PROMPT_FORMATS:
            p.append(f"--prompt-format {self.prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
        if self.dtype not in DTYPES:
            p.append(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if p:
            raise GenerateError("; ".join(p))


# ---------------------------------------------------------------------------------------------------
# generation (also used by the trainer's samples)


def complete(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Completion ids (to EOS, which is dropped) for prompt ids, in batches padded on the left;
    `num_return_sequences` per prompt, in prompt order. `synced_gpus`: every rank calls this with the
    same prompts and keeps stepping until all are done (ZeRO-3 / FSDP gather each layer's weights)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
        pad_token_id=pad, eos_token_id=eos, use_cache=True,
        **({"temperature": temperature, "top_p": top_p} if do_sample else {}),
    )  # fmt: skip
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced_gpus
            )
        for row in generated[:, width:].tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
    return out


# ---------------------------------------------------------------------------------------------------
# loading


def _model_dir(path: Path) -> tuple[Path, str]:
    """(directory, "adapter" | "full") for any of the accepted layouts (see the module docstring)."""
    from orpo_dist.export import _resolve_checkpoint

    try:
        return _resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise GenerateError(str(e)) from None


def load(model_dir: str | Path, options: Options):
    """(model in eval mode, tokenizer, whether prompts go through the chat template, max prompt length)."""
    from transformers import AutoModelForCausalLM

    from orpo_dist.modeling import load_tokenizer
    from orpo_dist.templates import read_prompt_format

    path, kind = _model_dir(Path(model_dir))
    trust = options.trust_remote_code
    base = None
    if kind == "adapter":
        from orpo_dist.export import _base_model_path

        try:
            base = _base_model_path(path, options.base_model)
        except (FileNotFoundError, ValueError) as e:
            raise GenerateError(f"{e}") from None
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    try:
        tokenizer = load_tokenizer(str(path if has_tokenizer or not base else base), trust, "tokenizer")
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load the tokenizer of {path}: {e}") from None
    dtype = "auto" if options.dtype == "auto" else getattr(torch, options.dtype)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base or str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust
        )
    except OSError as e:
        what = f"the adapter's base model {base!r}" if base else str(path)
        raise GenerateError(f"cannot load {what}: {str(e).splitlines()[0]}") from None
    if base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
    model.to(device).eval()
    recorded = read_prompt_format(path)
    if options.prompt_format != "auto":
        chat = options.prompt_format == "chat"
    else:
        chat = recorded == "chat" if recorded else bool(getattr(tokenizer, "chat_template", None))
    max_prompt = _max_prompt_length(path)
    return model, tokenizer, chat, max_prompt


def _max_prompt_length(path: Path) -> int | None:
    """The run's max_prompt_length (prompts keep their last tokens, as in training), if it was recorded."""
    import yaml

    try:
        config = yaml.safe_load((path / "orpo_config.yaml").read_text())
        value = config["data"]["max_prompt_length"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def encode(tokenizer, prompts: list, chat: bool, max_prompt: int | None = None) -> list[list[int]]:
    """Prompt ids exactly as training made them: rendered, tokenised (BOS once), the last tokens kept."""
    from orpo_dist.data.tokens import prompt_ids
    from orpo_dist.templates import render_prompt

    try:
        texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    except Exception as e:  # templates raise their own errors (role order, no template, ...)
        raise GenerateError(f"the chat template failed on a prompt: {e}") from None
    ids = prompt_ids(tokenizer, texts)
    return [p[-max_prompt:] if max_prompt else p for p in ids]


# ---------------------------------------------------------------------------------------------------
# the Python API


def generate(model_dir: str | Path, prompts: list, **options) -> list[str]:
    """Completions of `prompts` (text, or lists of {role, content} messages) by the model in `model_dir`;
    `num_return_sequences` per prompt, in order. Options: see `Options` (greedy by default)."""
    opts = Options(**options)
    opts.check()
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    prompts = [_prompt_value(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    if not prompts:
        raise GenerateError("no prompts given")
    model, tokenizer, chat, max_prompt = load(model_dir, opts)
    return _run(model, tokenizer, encode(tokenizer, prompts, chat, max_prompt), opts)


def _run(model, tokenizer, ids: list[list[int]], opts: Options) -> list[str]:
    torch.manual_seed(opts.seed)
    sample = opts.temperature > 0
    out = complete(model, tokenizer, ids, opts.max_new_tokens, opts.batch_size, do_sample=sample,
                   temperature=opts.temperature or 1.0, top_p=opts.top_p,
                   num_return_sequences=opts.num_return_sequences)  # fmt: skip
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def _prompt_value(value, where: str):
    """A prompt is text or a non-empty list of {role, content} messages; a {prompt|messages} record too."""
    if isinstance(value, dict):
        if "messages" in value:
            value = value["messages"]
        elif "prompt" in value:
            value = value["prompt"]
        else:
            raise GenerateError(f"{where}: expected a `prompt` or `messages` field, got {sorted(value)}")
    if isinstance(value, str):
        if not value.strip():
            raise GenerateError(f"{where}: the prompt is empty")
        return value
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise GenerateError(f"{where}: a prompt is text or a list of {{role, content}} messages")
    return value


# ---------------------------------------------------------------------------------------------------
# the command


def read_prompts(text: str, where: str) -> list:
    """JSON lines with a `prompt` or `messages` field, or plain text lines (one prompt each)."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise GenerateError(f"{where} has no prompts (it is empty)")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except ValueError as e:
            raise GenerateError(f"{where} line {n}: not JSON ({e}); use one JSON object per line") from None
        if not isinstance(record, dict):
            raise GenerateError(f"{where} line {n}: expected a JSON object with `prompt` or `messages`")
        prompts.append(_prompt_value(record, f"{where} line {n}"))
    return prompts


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as every orpo_dist user mistake
        raise GenerateError(message)


def parser() -> argparse.ArgumentParser:
    d = Options()
    p = _Parser(
        prog="python -m orpo_dist.generate",
        description="Generate completions with a trained model (greedy unless --temperature > 0); "
        "prints prompt -> completion, or JSON lines with --json. Nothing is written to disk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "model", help="a run's output_dir, final/, checkpoint-N/, an exported model or a model dir"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="JSON lines with `prompt` or `messages`, or plain text lines; "
                   "without --prompt or --prompts-file, prompts are read from stdin the same way")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens generated at most")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--num-return-sequences", type=int, default=d.num_return_sequences,
                   help="completions per prompt (with --temperature > 0)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sampling")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per generate call")
    p.add_argument("--prompt-format", default=d.prompt_format, choices=PROMPT_FORMATS,
                   help="auto: as the run trained (prompt_format.json; else the chat template if the tokenizer "
                   "has one); chat: through the chat template as a user message; text: as given")  # fmt: skip
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="weights dtype (auto: as saved)")
    p.add_argument("--base-model", default=d.base_model, help="override the adapter's base model")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    p.add_argument("--json", action="store_true", help="one JSON object per completion: prompt, completion")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command: a mistake exits 2, an environment fault (a full disk, the network) 1, one line each."""
    from orpo_dist.exits import fail, guarded

    def body() -> int:
        try:
            return _main(sys.argv[1:] if argv is None else argv)
        except GenerateError as e:
            return fail(str(e), 2)

    return guarded(body)


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    opts = Options(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        num_return_sequences=args.num_return_sequences, seed=args.seed, batch_size=args.batch_size,
        prompt_format=args.prompt_format, dtype=args.dtype, base_model=args.base_model, device=args.device,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    opts.check()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout / stderr carry completions and one-line errors only
    prompts: list = [_prompt_value(p, f"--prompt {i + 1}") for i, p in enumerate(args.prompt)]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise GenerateError(f"--prompts-file {path}: no such file")
        prompts += read_prompts(path.read_text(encoding="utf-8", errors="replace"), str(path))
    if not args.prompt and not args.prompts_file:
        if sys.stdin is None or sys.stdin.isatty():
            raise GenerateError("no prompts: give --prompt TEXT, --prompts-file FILE, or pipe them on stdin")
        prompts = read_prompts(sys.stdin.read(), "stdin")
    if not Path(args.model).exists():
        raise GenerateError(f"model {args.model!r} does not exist")
    model, tokenizer, chat, max_prompt = load(args.model, opts)
    completions = _run(model, tokenizer, encode(tokenizer, prompts, chat, max_prompt), opts)
    n = opts.num_return_sequences
    for i, completion in enumerate(completions):
        prompt = prompts[i // n]
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            shown = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
            print(f"{shown.rstrip()!r} -> {completion!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

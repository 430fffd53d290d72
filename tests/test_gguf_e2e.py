"""GGUF export end to end, as a user runs it: LoRA ORPO training through the public API with
`export: [merged_16bit, gguf]`, then the files checked with llama.cpp itself.

`orpo_dist.train` trains a LoRA adapter on `builtin:small` (hidden 256, 4 layers: K-quant blocks are
256 wide, so q4_k_m really writes Q4_K here; on hidden < 256 llama.cpp silently falls back to other types)
and writes <output_dir>/export/merged/ and <output_dir>/export/model-q4_k_m.gguf. q8_0 and f16 are
quantised from the same merged model with `export.to_gguf`. Checked: the tensor types, the chat template
and tokenizer round-trip (GGUF metadata and llama.cpp's own tokenizer against the HF tokenizer), and
llama.cpp's next-token argmax against the merged model loaded with `from_pretrained` in float32.

Needs the optional toolchain (`bash scripts/install_gguf.sh`); skips without it, unless
ORPO_DIST_REQUIRE_GGUF=1 (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from orpo_dist import gguf as gguf_export

REQUIRE_ENV = "ORPO_DIST_REQUIRE_GGUF"
# Measured on this run (2-core AMD EPYC, torch 2.13 CPU, llama-cpp-python 0.3.36), 214 positions:
# argmax agreement q4_k_m 0.995, q8_0 1.0, f16 1.0; max |delta logit| 0.60 / 0.063 / 0.0025.
MIN_AGREEMENT = {"q4_k_m": 0.90, "q8_0": 0.95, "f16": 0.99}
MAX_F16_LOGIT_ERR = 0.02
TOKENIZER_TEXTS = [
    "Write in capitals: hello\n",
    "Write in small letters: ABC\nabc",
    " two  spaces\tand a tab\n\nend",
    "a~b{c}|!<|user|>x</s>",
]
CHAT = [
    {"role": "system", "content": "Follow the rule."},
    {"role": "user", "content": "Write in capitals: orpo"},
    {"role": "assistant", "content": "ORPO"},
    {"role": "user", "content": "Write in small letters: GGUF"},
]


def _gguf_toolchain() -> None:
    """Skip without the GGUF toolchain; fail instead when ORPO_DIST_REQUIRE_GGUF is set (CI)."""
    problem = None
    for mod in ("llama_cpp", "gguf"):
        try:
            __import__(mod)
        except ImportError:
            problem = f"{mod} not installed: run `bash scripts/install_gguf.sh` for the GGUF toolchain"
            break
    if problem is None:
        try:
            gguf_export.find_converter()
        except (FileNotFoundError, ImportError) as e:
            problem = f"GGUF toolchain incomplete: {e}"
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{problem} ({REQUIRE_ENV} is set: the GGUF tests must run, not skip)", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One ORPO LoRA run through the public API, exporting merged_16bit and q4_k_m GGUF at the end."""
    _gguf_toolchain()
    import orpo_dist

    out = tmp_path_factory.mktemp("gguf_e2e") / "run"
    # lr 5e-3 for 30 steps: the adapter learns the task's characters (next-token accuracy 0.67 on
    # held-out pairs, 15 distinct argmax tokens); at lr 1e-2 it collapses to 2-3 frequent characters,
    # and argmax agreement would then be trivially high.
    result = orpo_dist.train(
        {
            "model": "builtin:small",
            "data_path": "builtin:case_rule",
            "max_samples": 240,
            "eval_split": 0,
            "eval_on_start": False,
            "max_length": 40,
            "max_prompt_length": 32,
            "batch_size": 8,
            "max_steps": 30,
            "lr": 5e-3,
            "warmup_ratio": 0.0,
            "peft": True,
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "seed": 42,
            "logging_steps": 10,
            "save_steps": None,
            "log": "none",
            "output_dir": str(out),
            "export": ["merged_16bit", "gguf"],
            "gguf_quant": "q4_k_m",
        }
    )
    assert result.global_step == 30
    return result


@pytest.fixture(scope="module")
def merged(run) -> Path:
    return Path(run.output_dir) / "export" / "merged"


@pytest.fixture(scope="module")
def hf_tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merged)


@pytest.fixture(scope="module")
def eval_ids(hf_tokenizer) -> list[list[int]]:
    """Held-out case-rule texts (another seed than training's), plus one chat-template conversation."""
    from orpo_dist.builtin import case_rule_pairs

    texts = [p["prompt"] + p["chosen"] + hf_tokenizer.eos_token for p in case_rule_pairs(5, seed=123)]
    ids = [hf_tokenizer(t)["input_ids"] for t in texts]
    chat = hf_tokenizer.apply_chat_template(CHAT[:3], tokenize=False)
    return [*ids, hf_tokenizer(chat, add_special_tokens=False)["input_ids"]]


def _hf_logits(model_dir: Path, ids: list[list[int]]) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([i])).logits[0].numpy() for i in ids]


@pytest.fixture(scope="module")
def hf_logits(merged, eval_ids) -> list[np.ndarray]:
    return _hf_logits(merged, eval_ids)


@pytest.fixture(scope="module")
def gguf_files(run, merged) -> dict[str, Path]:
    export_dir = Path(run.output_dir) / "export"
    files = {"q4_k_m": export_dir / "model-q4_k_m.gguf"}
    for quant in ("q8_0", "f16"):
        files[quant] = gguf_export.to_gguf(merged, export_dir / f"model-{quant}.gguf", quant)
    return files


def test_run_writes_both_exports_of_a_trained_adapter(run, merged, eval_ids, hf_logits):
    export_dir = Path(run.output_dir) / "export"
    assert (export_dir / "model-q4_k_m.gguf").is_file()
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert (Path(run.final_dir) / "adapter_model.safetensors").is_file()

    # The adapter is far from trivial: the merged model predicts the task's next characters, the base not
    # (accuracy over the case-rule texts; the last text, a chat conversation, is not what it was trained on).
    task_ids = eval_ids[:-1]
    targets = np.concatenate([np.array(i[1:]) for i in task_ids])
    base_logits = _hf_logits(Path(run.output_dir) / "base_model", task_ids)
    acc = {
        name: float((np.concatenate([x.argmax(-1)[:-1] for x in logits]) == targets).mean())
        for name, logits in (("merged", hf_logits[:-1]), ("base", base_logits))
    }
    distinct = len(set(np.concatenate(hf_logits).argmax(-1).tolist()))
    print(f"next-token accuracy {acc}; distinct argmax tokens of the merged model: {distinct}")
    assert acc["merged"] > 0.5 and acc["base"] < 0.1, acc  # measured 0.67 vs 0.01
    assert distinct >= 8, distinct  # measured 15: agreement below is not about one or two tokens


def test_q4_k_m_file_holds_q4_k_tensors(gguf_files):
    import gguf

    reader = gguf.GGUFReader(str(gguf_files["q4_k_m"]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    matrices = {n: ty for n, ty in types.items() if not n.endswith("norm.weight")}
    counts = {ty: list(matrices.values()).count(ty) for ty in set(matrices.values())}
    print(f"q4_k_m tensor types: {counts}")
    # q4_k_m: Q4_K, with Q6_K for some attn_v / ffn_down and the output matrix; no silent fallback types
    assert set(matrices.values()) <= {"Q4_K", "Q6_K"}, types
    assert counts.get("Q4_K", 0) > len(matrices) / 2, counts
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
    sizes = {q: os.path.getsize(f) for q, f in gguf_files.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"], sizes


def _field_str(reader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_chat_template_and_tokenizer_round_trip(gguf_files, hf_tokenizer):
    import gguf
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    path = gguf_files["q4_k_m"]
    template = hf_tokenizer.chat_template
    assert template and _field_str(gguf.GGUFReader(str(path)), "tokenizer.chat_template") == template

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == template
        assert (llm.token_bos(), llm.token_eos()) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
        assert llm.n_vocab() == len(hf_tokenizer)

        # llama-cpp-python's chat formatter, fed the GGUF's template, renders what transformers renders
        hf_chat = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            bos_token=hf_tokenizer.bos_token,
            eos_token=hf_tokenizer.eos_token,
        )
        assert formatter(messages=CHAT).prompt == hf_chat

        checked = 0
        for text in TOKENIZER_TEXTS:
            want = hf_tokenizer(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
            assert llm.detokenize(want[1:], special=True).decode() == text
            checked += 1
        want = hf_tokenizer(hf_chat, add_special_tokens=False)["input_ids"]
        assert want[0] == hf_tokenizer.bos_token_id
        assert llm.tokenize(hf_chat.encode(), add_bos=False, special=True) == want
        assert llm.detokenize(want, special=True).decode() == hf_chat
        checked += 1
        print(f"tokenizer ids equal on {checked}/{checked} texts (chat-template prompt included)")
    finally:
        llm.close()


@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0", "f16"])
def test_llama_cpp_argmax_agrees_with_merged_model(quant, gguf_files, eval_ids, hf_logits):
    from llama_cpp import Llama

    llm = Llama(str(gguf_files[quant]), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        got = []
        for ids in eval_ids:
            llm.reset()
            llm.eval(ids)
            got.append(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    got, want = np.concatenate(got), np.concatenate(hf_logits)
    assert got.shape == want.shape and np.isfinite(got).all()
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    err = np.abs(got - want).max()
    print(f"{quant}: argmax agreement {agree:.3f} over {len(want)} positions; max |delta logit| {err:.4f}")
    assert agree >= MIN_AGREEMENT[quant], (quant, agree)
    if quant == "f16":
        assert err < MAX_F16_LOGIT_ERR, err  # the merged model is bf16, which f16 holds almost exactly

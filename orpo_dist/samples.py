"""Samples during training: what the model writes for a few held-out prompts, at every eval.

`sample_prompts` held-out pairs are drawn once, with the seed, by a private `random.Random` (the training
RNG streams are never drawn from), and completed greedily at the eval before training, at every eval and
at the end. Rank 0 appends them to `<output_dir>/samples.jsonl` (step, prompt, completion, and the pair's
chosen and rejected for reference) and sends them to the tracker (`eval/samples`: a wandb Table, a
tensorboard text). For a built-in task whose answers can be checked (builtin.BUILTIN_CHECKS), up to
SCORED held-out prompts are completed as well and scored: `eval_generation/rule_followed` and
`eval_generation/exact`. `eval_sample_seconds` is what generating cost at that eval.

Who generates: under DDP (and ZeRO-1/2) every rank holds the whole model, so rank 0 generates alone while
the others wait at a barrier. Under ZeRO-3 / FSDP each rank holds a shard and every forward gathers the
weights from all ranks, so every rank generates the same prompts with `synced_gpus` (each keeps stepping
until all are done) and only rank 0 writes. Generating never changes training: the model goes back to
train mode, the KV cache is used only inside `generate` (model.config.use_cache is untouched), decoding
is greedy and the torch RNG is forked around it anyway.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

from orpo_dist.builtin import builtin_check
from orpo_dist.distributed import is_sharded
from orpo_dist.generation import complete
from orpo_dist.report import SAMPLES_FILE, read_samples

SCORED = 200  # held-out prompts scored per eval for a checkable built-in task
MAX_NEW_TOKENS = 256  # a sample is at most twice its pair's longest chosen answer, and at most this


class Samples:
    def __init__(self, cfg, eval_ds, tokenizer, accelerator, tracker=None, say=print):
        self.accelerator, self.tokenizer, self.tracker = accelerator, tokenizer, tracker
        self.path = Path(cfg.train.output_dir) / SAMPLES_FILE
        n = min(cfg.train.sample_prompts, len(eval_ds) if eval_ds is not None else 0)
        if n and cfg.train.sequence_parallel_size > 1:  # Ulysses attention splits every sequence over ranks
            say("samples: off under sequence parallelism; after training: python -m orpo_dist.generate")
            n = 0
        self.check = builtin_check(cfg.data.data_path) if n else None
        self.batch_size = 2 * (cfg.train.eval_batch_size or cfg.train.batch_size)
        self.pairs: list[dict] = []
        self.scored: list[tuple[list[int], str]] = []
        if not n:
            return
        picked = sorted(random.Random(cfg.train.seed).sample(range(len(eval_ds)), n))
        for i in picked:
            pair = eval_ds[i]
            self.pairs.append({"ids": pair["prompt_ids"], "prompt": self._text(pair["prompt_ids"]),
                               "chosen": self._text(pair["chosen_ids"]), "rejected": self._text(pair["rejected_ids"])})  # fmt: skip
        longest = max(len(eval_ds[i]["chosen_ids"]) for i in picked)
        if self.check:
            rows = eval_ds.select(range(min(SCORED, len(eval_ds))))
            self.scored = [(r["prompt_ids"], self._text(r["prompt_ids"])) for r in rows]
            longest = max(longest, max(len(ids) for ids in rows["chosen_ids"]))
        self.max_new_tokens = min(MAX_NEW_TOKENS, 2 * longest)

    @property
    def enabled(self) -> bool:
        return bool(self.pairs)

    def _text(self, ids: list[int]) -> str:
        """The text of prompt or answer ids, special tokens shown except BOS / EOS / padding."""
        tok = self.tokenizer
        hidden = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        return tok.decode([i for i in ids if i not in hidden], skip_special_tokens=False)

    def start(self, resumed_step: int | None) -> None:
        """As metrics.jsonl: a resume keeps the rows up to its step, a fresh start moves the old file aside."""
        if not self.enabled or not self.accelerator.is_main_process or not self.path.exists():
            return
        if resumed_step is None:
            os.replace(self.path, self.path.with_name("samples.previous.jsonl"))
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resumed_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        self.path.write_text("".join(kept))

    def __call__(self, model, step: int) -> dict[str, float]:
        """Generate, write (rank 0) and score; returns the eval row's generation metrics (rank 0)."""
        if not self.enabled:
            return {}
        accelerator, sharded = self.accelerator, is_sharded(self.accelerator)
        out = {}
        if sharded or accelerator.is_main_process:
            t0 = time.perf_counter()
            completions = self._generate(model, synced=sharded and accelerator.num_processes > 1)
            seconds = time.perf_counter() - t0
            if accelerator.is_main_process:
                out = self._record(step, completions, seconds)
        accelerator.wait_for_everyone()  # DDP: the other ranks waited here while rank 0 generated
        return out

    def _generate(self, model, synced: bool) -> list[str]:
        accelerator = self.accelerator
        net = accelerator.unwrap_model(model)
        was_training = net.training
        net.eval()
        prompts = [p["ids"] for p in self.pairs] + [ids for ids, _ in self.scored]
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), accelerator.autocast():
                ids = complete(
                    net, self.tokenizer, prompts, self.max_new_tokens, self.batch_size, synced_gpus=synced
                )
        finally:
            net.train(was_training)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def _record(self, step: int, completions: list[str], seconds: float) -> dict[str, float]:
        n = len(self.pairs)
        rows = [{"step": step, "prompt": p["prompt"], "completion": c, "chosen": p["chosen"],
                 "rejected": p["rejected"]} for p, c in zip(self.pairs, completions[:n])]  # fmt: skip
        with self.path.open("a") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if self.tracker is not None:
            self.tracker.log_samples(step, rows)
        metrics = {"eval_sample_seconds": seconds}
        checks = [self.check(prompt, c) for (_, prompt), c in zip(self.scored, completions[n:])]
        checks = [c for c in checks if c is not None]
        if checks:
            metrics["eval_generation/rule_followed"] = sum(f for f, _ in checks) / len(checks)
            metrics["eval_generation/exact"] = sum(e for _, e in checks) / len(checks)
        return metrics

    def describe(self, metrics: dict[str, float]) -> str:
        """One log line per eval: what generating cost, and the score where there is one."""
        what = f"{len(self.pairs)} samples" + (f" + {len(self.scored)} scored prompts" if self.scored else "")
        line = f"{what} generated in {metrics['eval_sample_seconds']:.1f} s (samples.jsonl)"
        if "eval_generation/rule_followed" in metrics:
            line += (
                f"; held-out generations follow the instruction {metrics['eval_generation/rule_followed']:.2f}, "
                f"exact answer {metrics['eval_generation/exact']:.2f}"
            )
        return line

    def summary(self, rows: list[dict]) -> list[str]:
        """The end of the log: the generation score before -> after, and each sample before -> after."""
        if not self.enabled or not self.accelerator.is_main_process:
            return []
        lines = []
        scores = [r for r in rows if "eval_generation/rule_followed" in r]
        if len(scores) >= 2:
            first, last = scores[0], scores[-1]
            lines.append(
                f"held-out generations follow the instruction: {first['eval_generation/rule_followed']:.2f} before "
                f"-> {last['eval_generation/rule_followed']:.2f} after (exact answer: "
                f"{first['eval_generation/exact']:.2f} -> {last['eval_generation/exact']:.2f}; {len(self.scored)} prompts, greedy)"
            )
        by_step = read_samples(self.path.parent)
        if len(by_step) >= 2:
            (s0, before), (s1, after) = by_step[0], by_step[-1]
            lines.append(f"samples (held-out, greedy), step {s0} -> step {s1}:")
            for b, a in zip(before, after):
                lines.append(
                    f"  {_show(b['prompt'].rstrip())} -> {_show(b['completion'])} -> {_show(a['completion'])}"
                )
        return lines


def _show(text: str, width: int = 60) -> str:
    text = text if len(text) <= width else text[:width] + "…"
    return repr(text)

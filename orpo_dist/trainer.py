"""The training loop, written out: for epoch / for step / for micro-batch, on `accelerate`.

accelerate owns device placement, DDP / DeepSpeed / FSDP wrapping, mixed precision, the
accumulation boundary, checkpoint state and trackers; this file owns the order of things.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from orpo_dist import distributed as dist
from orpo_dist.collate import make_collator
from orpo_dist.config import Config
from orpo_dist.data import build_datasets
from orpo_dist.loss import forward_parts
from orpo_dist.modeling import load_model, load_tokenizer, output_head, resolve_model_path

log = logging.getLogger("orpo_dist")
PREEMPTED_EXIT_CODE = 3
COMPLETE_MARKER = "COMPLETE"
METRIC_KEYS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "log_odds_ratio",
    "log_odds_chosen",
]


@dataclass
class Progress:
    """The data position, saved with every checkpoint so resume continues the same data order."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_dir: Path | None
    metrics: list[dict] = field(default_factory=list)  # every logged row (rank 0)
    preempted: bool = False


class Preemption:
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: save at the next step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():  # a Python-API caller gets its handlers back
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("received signal %s: will checkpoint after this step and exit", signum)


class MetricWindow:
    """Sums over a logging window, reduced over ranks only when logged."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def reduce(self, accelerator, beta: float, prefix: str = "") -> dict[str, float]:
        keys = sorted(self.sums)
        total = dist.all_sum(
            accelerator, torch.stack([torch.as_tensor(self.sums[k]).to(accelerator.device) for k in keys])
        )
        s = dict(zip(keys, total.tolist()))
        self.sums = {}
        pairs = max(s["pairs"], 1.0)
        out = {f"{prefix}{k}": s[k] / pairs for k in METRIC_KEYS}
        out[f"{prefix}nll_loss"] = s["nll_sum"] / max(s["nll_tokens"], 1.0)
        out[f"{prefix}loss"] = out[f"{prefix}nll_loss"] + beta * s["or_sum"] / pairs
        out[f"{prefix}num_tokens"] = s["num_tokens"]
        return out


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.accelerator = acc = dist.make_accelerator(cfg)
        dist.check_world_size(acc)
        set_seed(cfg.train.seed)
        self.out = Path(cfg.train.output_dir)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
        self.log(dist.describe(acc, cfg))

        # downloads, the built-in model and the tokenised-data cache are made once, by rank 0 first
        with acc.main_process_first():
            self.model_path = resolve_model_path(cfg)
            self.tokenizer = load_tokenizer(self.model_path, cfg.model.trust_remote_code)
            self.train_ds, self.eval_ds, report = build_datasets(cfg.data, self.tokenizer, cfg.train.seed)
        for line in report.lines():
            self.log(line)

        self.model = load_model(
            cfg, self.model_path, acc.num_processes, acc.device, sharded=dist.is_sharded(acc), say=self.log
        )
        if cfg.lora.peft and acc.is_main_process:
            self.model.print_trainable_parameters()
        self.collate = make_collator(cfg.orpo.layout, self.tokenizer.pad_token_id, cfg.orpo.nll_scope)
        lengths = [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(
                self.train_ds["prompt_ids"], self.train_ds["chosen_ids"], self.train_ds["rejected_ids"]
            )
        ]
        t = cfg.train
        self.shards = dist.PairShards(
            lengths,
            t.batch_size,
            t.gradient_accumulation,
            acc.num_processes,
            acc.process_index,
            t.seed,
            group_by_length=t.group_by_length,
        )
        steps_per_epoch = self.shards.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
        self.num_epochs = math.ceil(self.total_steps / steps_per_epoch)

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = get_scheduler(
            t.scheduler,
            optimizer,
            num_warmup_steps=int(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        # the scheduler is stepped by hand once per optimizer step (prepare() would step it per process)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.lm_head = output_head(acc.unwrap_model(self.model))
        self.progress = Progress()
        acc.register_for_checkpointing(self.scheduler, self.progress)
        if cfg.lora.peft and acc.distributed_type != DistributedType.DEEPSPEED:
            acc.register_save_state_pre_hook(_keep_trainable_only)
        if acc.is_main_process and cfg.train.log != "none":
            _init_tracker(acc, cfg)
        self.metrics_file = self.out / "metrics.jsonl"
        self.rows: list[dict] = []
        self.last_eval_step: int | None = None

    # ---------------------------------------------------------------- logging
    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[orpo_dist] {msg}", flush=True)

    def write_metrics(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        if self.accelerator.is_main_process:
            self.rows.append(row)
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.cfg.train.log != "none":
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    # ---------------------------------------------------------------- batches
    def batches(self, dataset, pairs: list[tuple[int, float]]) -> dict[str, torch.Tensor]:
        rows = dataset[[i for i, _ in pairs]]
        examples = [
            dict(
                id=rows["id"][j],
                prompt_ids=rows["prompt_ids"][j],
                chosen_ids=rows["chosen_ids"][j],
                rejected_ids=rows["rejected_ids"][j],
                weight=w,
            )
            for j, (_, w) in enumerate(pairs)
        ]
        batch = self.collate(examples)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def trace(self, batches) -> None:
        """ORPO_DIST_TRACE_DIR=dir: each rank records the pair ids it trained on (for tests and audits)."""
        trace_dir = os.environ.get("ORPO_DIST_TRACE_DIR")
        if trace_dir:
            ids = [int(i) for b in batches for i, w in zip(b["ids"], b["pair_weight"]) if w > 0]
            row = {
                "rank": self.accelerator.process_index,
                "world_size": self.accelerator.num_processes,
                "step": self.progress.global_step + 1,
                "ids": ids,
            }
            with open(Path(trace_dir) / f"rank{self.accelerator.process_index}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def parts(self, batch):
        return forward_parts(self.model, self.lm_head, batch, self.cfg.orpo.logps_chunk_size)

    @staticmethod
    def counts(batch) -> torch.Tensor:
        """(NLL tokens, pairs) of a micro-batch, computable before the forward."""
        w = batch["pair_weight"].float()
        return torch.stack([(w[batch["pair"]] * batch["nll"].float()).sum(), w.sum()])

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_ds is None:
            return {}
        acc, t = self.accelerator, self.cfg.train
        self.model.eval()
        shards = dist.PairShards(
            [0] * len(self.eval_ds),
            t.eval_batch_size or t.batch_size,
            1,
            acc.num_processes,
            acc.process_index,
            t.seed,
            shuffle=False,
        )
        window = MetricWindow()
        for _, pairs in shards.micro_batches(0):
            batch = self.batches(self.eval_ds, pairs)
            with acc.autocast():
                p = self.parts(batch)
            window.add(_sums(p, batch, self.cfg.orpo.beta))
        self.model.train()
        out = window.reduce(acc, self.cfg.orpo.beta, prefix="eval_")
        out.pop("eval_num_tokens")
        return out

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = self.out / f"checkpoint-{self.progress.global_step}"
        acc.save_state(str(path / "state"))
        self.save_model(path / "model")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (path / COMPLETE_MARKER).write_text(json.dumps(self.progress.state_dict()))
            self.rotate_checkpoints()
        acc.wait_for_everyone()
        self.log(f"saved checkpoint {path}")
        return path

    def save_model(self, path: Path) -> None:
        """Weights (adapter for PEFT) gathered across ranks by accelerate; written by rank 0."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # collective under ZeRO-3 / FSDP: every rank calls it
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(path, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
            self.cfg.save(path / "orpo_config.yaml")

    def rotate_checkpoints(self) -> None:
        limit = self.cfg.train.save_total_limit
        done = complete_checkpoints(self.out)
        for old in done[:-limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)

    def maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if not resume:
            return
        if resume in ("auto", "latest"):
            found = complete_checkpoints(self.out)
            if not found:
                if resume == "latest":
                    raise FileNotFoundError(f"resume: latest but no complete checkpoint in {self.out}")
                self.log("resume: auto found no checkpoint; starting fresh")
                return
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / COMPLETE_MARKER).exists():
                raise FileNotFoundError(
                    f"resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER} file)"
                )
        kwargs = (
            {}
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED
            else {"strict": not self.cfg.lora.peft}
        )
        self.accelerator.load_state(str(path / "state"), **kwargs)
        self.log(
            f"resumed from {path} at step {self.progress.global_step} "
            f"(epoch {self.progress.epoch}, step {self.progress.step_in_epoch} of it)"
        )

    # ---------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        self.maybe_resume()
        with Preemption() as preempt:
            return self._train(preempt)

    def _train(self, preempt: Preemption) -> TrainResult:
        acc, cfg, t = self.accelerator, self.cfg, self.cfg.train
        if t.eval_on_start and self.progress.global_step == 0:
            self.log_eval(step=0)
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.progress.global_step,
            disable=not acc.is_main_process,
            desc="orpo",
            dynamic_ncols=True,
        )
        window, t0, grad_norm = MetricWindow(), time.perf_counter(), None
        steps_per_epoch, accum = self.shards.steps_per_epoch, t.gradient_accumulation
        stop = self.progress.global_step >= self.total_steps

        while not stop and self.progress.epoch < self.num_epochs:
            micro = self.shards.micro_batches(self.progress.epoch, self.progress.step_in_epoch)
            for _ in range(self.progress.step_in_epoch, steps_per_epoch):
                batches = [self.batches(self.train_ds, next(micro)[1]) for _ in range(accum)]
                self.trace(batches)
                # normalise by the whole step's token and pair counts, over all micro-batches and ranks,
                # so accumulation and data parallelism give the gradient of one big batch
                nll_tokens, pairs = dist.all_sum(acc, sum(self.counts(b) for b in batches)).tolist()
                # accelerate divides by `accum`; DDP/ZeRO average over ranks: undo both
                scale = accum * acc.num_processes
                for batch in batches:
                    with acc.accumulate(self.model), acc.autocast():
                        p = self.parts(batch)
                        loss = p.loss(cfg.orpo.beta, nll_tokens, pairs) * scale
                        acc.backward(loss)
                        if acc.sync_gradients:  # max_grad_norm 0: measure the norm, don't clip
                            grad_norm = acc.clip_grad_norm_(
                                self.model.parameters(), t.max_grad_norm or math.inf
                            )
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    window.add(_sums(p, batch, cfg.orpo.beta))
                self.scheduler.step()
                self.progress.global_step += 1
                self.progress.step_in_epoch += 1
                if self.progress.step_in_epoch == steps_per_epoch:
                    self.progress.epoch, self.progress.step_in_epoch = self.progress.epoch + 1, 0
                step = self.progress.global_step
                bar.update(1)

                if step % t.logging_steps == 0 or step == self.total_steps:
                    row = window.reduce(acc, cfg.orpo.beta)
                    elapsed = time.perf_counter() - t0
                    row["tokens_per_second"] = row.pop("num_tokens") / max(elapsed, 1e-9)
                    row.update(
                        step=step, epoch=step / steps_per_epoch, learning_rate=self.scheduler.get_last_lr()[0]
                    )
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    self.write_metrics(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
                    t0 = time.perf_counter()
                epoch_end = self.progress.step_in_epoch == 0
                if (t.eval_steps and step % t.eval_steps == 0) or (not t.eval_steps and epoch_end):
                    self.log_eval(step)
                saved = bool(t.save_steps and step % t.save_steps == 0 and step < self.total_steps)
                if saved:
                    self.save_checkpoint()
                # every rank must agree to stop, or the others hang in the next collective
                if dist.all_sum(acc, torch.tensor([float(preempt.requested)])).item() > 0:
                    bar.close()
                    if not saved:
                        self.save_checkpoint()
                    self.log(
                        f"preempted: checkpoint saved at step {step}; exit {PREEMPTED_EXIT_CODE} (resume with --resume auto)"
                    )
                    return TrainResult(self.out, step, None, self.rows, preempted=True)
                if step >= self.total_steps:
                    stop = True
                    break
        bar.close()
        if self.last_eval_step != self.progress.global_step:
            self.log_eval(self.progress.global_step)
        final = self.out / "final"
        self.save_model(final)
        acc.wait_for_everyone()
        if cfg.export.export:
            self.run_export(final)
        acc.end_training()
        evals = [r["eval_rewards/accuracies"] for r in self.rows if "eval_rewards/accuracies" in r]
        if len(evals) >= 2:
            self.log(f"held-out preference accuracy: {evals[0]:.3f} before -> {evals[-1]:.3f} after")
        self.log(f"done: {self.progress.global_step} steps; final model in {final}")
        return TrainResult(self.out, self.progress.global_step, final, self.rows)

    def log_eval(self, step: int) -> None:
        self.last_eval_step = step
        metrics = self.evaluate()
        if metrics:
            self.write_metrics({"step": step, **metrics})
            self.log(
                f"step {step}: held-out preference accuracy {metrics['eval_rewards/accuracies']:.3f} "
                f"(eval_loss {metrics['eval_loss']:.4f}, {len(self.eval_ds)} pairs)"
            )

    def run_export(self, final: Path) -> None:
        """Merge / GGUF on rank 0 only; the other ranks wait."""
        if self.accelerator.is_main_process:
            from orpo_dist.export import export

            written = export(
                final, self.out / "export", self.cfg.export.export, gguf_quant=self.cfg.export.gguf_quant
            )
            for fmt, path in written.items():
                self.log(f"exported {fmt}: {path}")
        self.accelerator.wait_for_everyone()


def _sums(p, batch, beta: float) -> dict[str, torch.Tensor]:
    return {
        **p.metric_sums(beta),
        "nll_sum": p.nll_sum.detach(),
        "nll_tokens": p.nll_tokens,
        "or_sum": p.or_sum.detach(),
        "pairs": p.pairs,
        "num_tokens": batch["num_tokens"].float(),
    }


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints whose save finished on every rank, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _keep_trainable_only(models, weights, output_dir) -> None:
    """PEFT runs: checkpoint the adapter, not a copy of the frozen (maybe 4-bit) base."""
    for model, state in zip(models, weights):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


def _init_tracker(acc, cfg: Config) -> None:
    if cfg.train.log == "wandb" and not os.environ.get("WANDB_API_KEY") and not _wandb_logged_in():
        os.environ.setdefault("WANDB_MODE", "offline")
        print(
            "[orpo_dist] wandb: no API key found; logging offline to ./wandb (sync later with `wandb sync`)",
            flush=True,
        )
    init_kwargs = (
        {"wandb": {"name": cfg.train.run_name, "dir": cfg.train.output_dir}}
        if cfg.train.log == "wandb"
        else {}
    )
    acc.init_trackers(cfg.train.wandb_project, config=_flat_config(cfg), init_kwargs=init_kwargs)


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


def _flat_config(cfg: Config) -> dict:
    return {
        k: v
        for section in cfg.to_dict().values()
        for k, v in section.items()
        if isinstance(v, (int, float, str, bool)) or v is None
    }


def run(cfg: Config) -> TrainResult:
    """Train with a validated config; the Python API behind `python -m orpo_dist.train`."""
    trainer = Trainer(cfg)
    return trainer.train()


def exit_code(result: TrainResult) -> int:
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m orpo_dist.train")

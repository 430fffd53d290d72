"""The training loop, written out: next batch -> forward/backward -> step -> log? -> eval? -> save? -> stop?

accelerate owns device placement, DDP / DeepSpeed / FSDP wrapping, mixed precision, the accumulation
boundary, checkpoint state and trackers. The pieces live in their own modules (data, layouts, loader,
modeling, logps, loss, optim, metrics, checkpoint, distributed); this file builds them and owns the
order of things.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from orpo_dist.checkpoint import Checkpointer
from orpo_dist.config import Config
from orpo_dist.data.cache import tokenised_datasets
from orpo_dist.distributed import (
    Preemption,
    all_sum,
    check_world_size,
    describe,
    is_sharded,
    make_accelerator,
    rank0_print,
)
from orpo_dist.hub import check_push
from orpo_dist.layouts import make_collator, model_inputs
from orpo_dist.loader import make_loaders
from orpo_dist.logps import forward_parts
from orpo_dist.loss import OrpoParts, batch_counts
from orpo_dist.metrics import MetricsLog, MetricWindow, step_sums
from orpo_dist.modeling import describe_model, load_model, load_tokenizer, output_head, resolve_model_path
from orpo_dist.optim import build_optimizer, check_optimizer, describe_optimizer
from orpo_dist.templates import example_lines
from orpo_dist.throughput import flops_model

PREEMPTED_EXIT_CODE = 3


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_dir: Path | None
    metrics: list[dict] = field(default_factory=list)  # every logged row (rank 0)
    preempted: bool = False


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg, t = cfg, cfg.train
        check_optimizer(t.optim)  # what can only be checked on this machine, before anything is written
        check_push(cfg)
        self.accelerator = accelerator = make_accelerator(cfg)
        check_world_size(accelerator)
        set_seed(t.seed)
        self.out = Path(t.output_dir)
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
        self.say(describe(accelerator, cfg))

        # downloads and the built-in model are made once, by rank 0 first; the tokenised data once per
        # job (per node with a node-local cache_dir), memory-mapped by every rank
        with accelerator.main_process_first():
            model_path = resolve_model_path(cfg)
            self.tokenizer = load_tokenizer(
                model_path, cfg.model.trust_remote_code, cfg.data.chat_template, self.say
            )
        data = tokenised_datasets(cfg, self.tokenizer, accelerator, self.say)
        example = example_lines(data.train, self.tokenizer, cfg.data.chat_template, data.report.format)
        for line in data.report.lines() + example:
            self.say(line)
        model = load_model(
            cfg, model_path, accelerator.num_processes, accelerator.device, is_sharded(accelerator), self.say
        )
        for line in describe_model(model):
            self.say(line)

        collate = make_collator(cfg.orpo.layout, self.tokenizer.pad_token_id, cfg.orpo.nll_scope)
        self.loader, self.eval_loader = make_loaders(t, data.train, data.eval, collate, accelerator)
        steps_per_epoch = self.loader.shards.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)

        optimizer, self.scheduler = build_optimizer(t, model, self.total_steps)
        self.say(f"layout {cfg.orpo.layout}; {describe_optimizer(t, optimizer, self.total_steps)}")
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.lm_head = output_head(accelerator.unwrap_model(self.model))
        self.checkpoints = Checkpointer(accelerator, cfg, self.tokenizer, self.scheduler)
        flops = flops_model(model, accelerator.device, t.peak_tflops, self.say)
        self.metrics = MetricsLog(accelerator, cfg, flops)
        self.last_eval_step: int | None = None

    def say(self, msg: str) -> None:
        rank0_print(self.accelerator, msg)

    def train(self) -> TrainResult:
        self.checkpoints.resume()
        with Preemption() as preempt:
            return self._loop(preempt)

    def _loop(self, preempt: Preemption) -> TrainResult:
        accelerator, t, progress = self.accelerator, self.cfg.train, self.checkpoints.progress
        if t.eval_on_start and progress.global_step == 0:
            self.log_eval(step=0)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=progress.global_step, desc="orpo", dynamic_ncols=True,
                   disable=not accelerator.is_main_process)  # fmt: skip
        window, t0 = MetricWindow(), time.perf_counter()
        steps = self.loader.steps(progress.epoch, progress.step_in_epoch, progress.global_step)
        while progress.global_step < self.total_steps:
            grad_norm = self.optimizer_step(next(steps), window)
            progress.advance(self.loader.shards.steps_per_epoch)
            step = progress.global_step
            if step % t.logging_steps == 0 or step == self.total_steps:
                epoch, lr = step / self.loader.shards.steps_per_epoch, self.scheduler.get_last_lr()[0]
                row = self.metrics.log_train(window, self.cfg.orpo.beta, time.perf_counter() - t0,
                                             self.loader.take_wait_seconds(), step=step, epoch=epoch,
                                             learning_rate=lr, grad_norm=grad_norm)  # fmt: skip
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}", accuracy=f"{row['rewards/accuracies']:.2f}", refresh=False
                )
                t0 = time.perf_counter()
            elif accelerator.is_main_process:  # between logging steps: rank 0's running window
                bar.set_postfix(**window.preview(self.cfg.orpo.beta), refresh=False)
            bar.update(1)
            epoch_end = progress.step_in_epoch == 0
            if (t.eval_steps and step % t.eval_steps == 0) or (not t.eval_steps and epoch_end):
                self.log_eval(step)
            saved = bool(t.save_steps and step % t.save_steps == 0 and step < self.total_steps)
            if saved:
                self.checkpoints.save(self.model)
            if preempt.agreed(accelerator):
                bar.close()
                if not saved:
                    self.checkpoints.save(self.model)
                self.say(f"preempted: checkpoint saved at step {step}; exit {PREEMPTED_EXIT_CODE} "
                         "(resume with --resume auto)")  # fmt: skip
                accelerator.end_training()  # trackers flushed and closed: the resumed run continues them
                return TrainResult(self.out, step, None, self.metrics.rows, preempted=True)
        bar.close()
        return self.finish()

    def optimizer_step(self, batches: list[dict], window: MetricWindow) -> torch.Tensor | None:
        """Forward/backward over the step's micro-batches, then one optimizer step; returns the grad norm."""
        accelerator, cfg = self.accelerator, self.cfg
        # normalise by the whole step's token and pair counts, over all micro-batches and ranks,
        # so accumulation and data parallelism give the gradient of one big batch
        nll_tokens, pairs = all_sum(accelerator, sum(batch_counts(b) for b in batches)).tolist()
        # accelerate divides each micro-batch's loss by the accumulation, DDP / ZeRO average over ranks: undo both
        scale = len(batches) * accelerator.num_processes
        grad_norm = None
        for batch in batches:
            with accelerator.accumulate(self.model), accelerator.autocast():
                parts = self.forward(batch)
                accelerator.backward(parts.loss(cfg.orpo.beta, nll_tokens, pairs) * scale)
                if accelerator.sync_gradients:  # max_grad_norm 0: measure the norm, don't clip
                    max_norm = cfg.train.max_grad_norm or math.inf
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add(step_sums(parts, batch, cfg.orpo.beta))
        self.scheduler.step()
        return grad_norm

    def forward(self, batch: dict) -> OrpoParts:
        inputs = model_inputs(batch, self.model)
        return forward_parts(self.model, self.lm_head, inputs, batch, self.cfg.orpo.logps_chunk_size)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_loader is None:
            return {}
        self.model.eval()
        window = MetricWindow()
        for batch in self.eval_loader.micro_batches(epoch=0):
            with self.accelerator.autocast():
                window.add(step_sums(self.forward(batch), batch, self.cfg.orpo.beta))
        self.model.train()
        out = window.reduce(self.accelerator, self.cfg.orpo.beta, prefix="eval_")
        out.pop("eval_num_tokens")
        return out

    def log_eval(self, step: int) -> None:
        self.last_eval_step = step
        metrics = self.evaluate()
        if metrics:
            self.metrics.write({"step": step, **metrics})
            n = len(self.eval_loader.dataset)
            self.say(f"step {step}: held-out preference accuracy {metrics['eval_rewards/accuracies']:.3f} "
                     f"(eval_loss {metrics['eval_loss']:.4f}, {n} pairs)")  # fmt: skip

    def finish(self) -> TrainResult:
        """Last eval, the final model, exports (rank 0 while the others wait), trackers closed."""
        accelerator, step = self.accelerator, self.checkpoints.progress.global_step
        if self.last_eval_step != step:
            self.log_eval(step)
        final = self.out / "final"
        self.checkpoints.save_model(self.model, final)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.publish(final)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        evals = [r["eval_rewards/accuracies"] for r in self.metrics.rows if "eval_rewards/accuracies" in r]
        if len(evals) >= 2:
            self.say(f"held-out preference accuracy: {evals[0]:.3f} before -> {evals[-1]:.3f} after")
        self.say(f"done: {step} steps; final model in {final}")
        return TrainResult(self.out, step, final, self.metrics.rows)

    def publish(self, final: Path) -> None:
        """Rank 0, after training: exports (`<output_dir>/export/merged/`, `export/model-<quant>.gguf`),
        the Hub upload, and the report (report.md, report.png)."""
        e, written = self.cfg.export, {}
        if e.formats:
            from orpo_dist.export import export

            out = self.out / "export"
            written = export(final, out, e.formats, gguf_quant=e.gguf_quant, merged_dir=out / "merged")
            for fmt, path in written.items():
                self.say(f"exported {fmt}: {path}")
        if e.push_to_hub:
            from orpo_dist.hub import push

            self.say(f"pushed to the Hub: {push(self.cfg, final, written)}")
        try:
            from orpo_dist.report import write_report

            write_report(self.out, say=self.say)
        except Exception as err:  # the report is a convenience: it never fails a finished run
            self.say(
                f"report not written ({type(err).__name__}: {err}); retry: python -m orpo_dist.report {self.out}"
            )


def run(cfg: Config) -> TrainResult:
    """Train with a validated config."""
    return Trainer(cfg).train()


def exit_code(result: TrainResult) -> int:
    return PREEMPTED_EXIT_CODE if result.preempted else 0

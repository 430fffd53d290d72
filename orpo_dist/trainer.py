"""The training loop, written out: next batch -> forward/backward -> step -> log? -> eval? -> save? -> stop?

accelerate owns device placement, DDP / DeepSpeed / FSDP wrapping, mixed precision, the accumulation
boundary, checkpoint state and trackers. The pieces live in their own modules (data, layouts, loader,
modeling, logps, loss, optim, metrics, checkpoint, distributed); this file builds them and owns the
order of things.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from orpo_dist import cadence, run_log, sequence_parallel
from orpo_dist.checkpoint import Checkpointer
from orpo_dist.config import Config, ConfigError
from orpo_dist.console import one_line
from orpo_dist.data.cache import tokenised_datasets
from orpo_dist.distributed import (
    agreed_start,
    all_sum,
    check_world_size,
    describe,
    gradient_average,
    is_sharded,
    make_accelerator,
    rank0_print,
)
from orpo_dist.health import Health, non_finite
from orpo_dist.hub import check_push, open_repo
from orpo_dist.layouts import make_collator, model_inputs
from orpo_dist.loader import make_loaders
from orpo_dist.logps import forward_parts
from orpo_dist.loss import OrpoParts, batch_counts
from orpo_dist.metrics import MetricsLog, MetricWindow
from orpo_dist.modeling import describe_model, load_model, load_tokenizer, output_head, resolve_model_path
from orpo_dist.optim import build_optimizer, check_optimizer, describe_optimizer
from orpo_dist.preemption import Preemption
from orpo_dist.preflight import check_model, check_run, check_special_tokens
from orpo_dist.resume import check_data, data_sha256, run_fingerprint
from orpo_dist.samples import Samples
from orpo_dist.templates import example_lines
from orpo_dist.throughput import flops_model
from orpo_dist.trackers import check_tracker

PREEMPTED_EXIT_CODE = 3


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_dir: Path | None
    metrics: list[dict] = field(default_factory=list)  # every logged row (rank 0)
    preempted: bool = False


class Trainer:
    def __init__(self, cfg: Config, preempt: Preemption):
        self.cfg, t, self.preempt = cfg, cfg.train, preempt
        self.beta = cfg.orpo.beta
        check_optimizer(t.optim)  # what can only be checked on this machine, before anything is written
        check_push(cfg)
        check_tracker(cfg)
        sequence_parallel.resolve(cfg)  # the SP size, settled once from cfg + launch (exit 2 if it cannot run)
        self.accelerator = accelerator = make_accelerator(cfg)
        check_world_size(accelerator)
        set_seed(t.seed)
        self.out = Path(t.output_dir)
        world, strategy = accelerator.num_processes, accelerator.distributed_type.value
        self.hub_url: str | None = None  # the Hub repo, opened before training (push_to_hub)
        # user mistakes end here, on every rank, before anything is loaded (exit 2)
        self.resume_point = agreed_start(accelerator, lambda: self._checks(world, strategy))
        if accelerator.is_main_process:
            cfg.save(self.out / "config.yaml")
        self.say(describe(accelerator, cfg))
        self.say(run_log.how_it_runs(accelerator, cfg))
        for note in self.resume_point.notes if self.resume_point else []:
            self.say(note)
        if t.resume == "auto" and not self.resume_point:
            self.say("resume: auto found no checkpoint; starting fresh")

        # downloads and the built-in model are made once, by rank 0 first; the tokenised data once per
        # job (per node with a node-local cache_dir), memory-mapped by every rank
        model_path, self.tokenizer = agreed_start(accelerator, self._inputs, first="main")
        data = tokenised_datasets(cfg, self.tokenizer, accelerator, self.say)
        train_ds, eval_ds, report = data.train, data.eval, data.report
        example = example_lines(train_ds, self.tokenizer, cfg.data.chat_template, report.format)
        for line in report.lines() + example:
            self.say(line)
        layout, pad, scope = cfg.orpo.layout, self.tokenizer.pad_token_id, cfg.orpo.nll_scope
        collate = make_collator(layout, pad, scope, *sequence_parallel.slice_of(accelerator))
        self.loader, self.eval_loader = make_loaders(t, train_ds, eval_ds, collate, accelerator)
        steps_per_epoch = self.loader.shards.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps >= 0 else math.ceil(t.epochs * steps_per_epoch)
        fingerprint = run_fingerprint(cfg, world, strategy)
        fingerprint.pairs, fingerprint.data_sha256 = len(train_ds), data_sha256(train_ds)
        if self.resume_point:
            check_data(self.resume_point, fingerprint, steps_per_epoch)

        model = load_model(
            cfg, model_path, accelerator.num_processes, accelerator.device, is_sharded(accelerator), self.say
        )
        for line in describe_model(model):
            self.say(line)
        optimizer, self.scheduler = build_optimizer(t, model, self.total_steps)
        self.say(f"layout {cfg.orpo.layout}; {describe_optimizer(t, optimizer, self.total_steps)}")
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.sp_reduce = sequence_parallel.enable(accelerator, self.model)  # None without SP
        self.lm_head = output_head(accelerator.unwrap_model(self.model))
        self.checkpoints = Checkpointer(
            accelerator, cfg, self.tokenizer, self.scheduler, fingerprint, report.format
        )
        flops = flops_model(model, accelerator.device, t.peak_tflops, self.say)
        self.metrics = MetricsLog(accelerator, cfg, flops)
        self.samples = Samples(cfg, eval_ds, self.tokenizer, accelerator, self.metrics.tracker, self.say)
        self.health = Health(cfg)

    def _checks(self, world: int, strategy: str):
        """check_run on every rank; the Hub repo opened once (rank 0), so a refused token stops every rank."""
        if self.accelerator.is_main_process:
            self.hub_url = open_repo(self.cfg)
        return check_run(self.cfg, world, strategy)

    def _inputs(self):
        """The model's path (a built-in one is written here), checked on the meta device, and its tokenizer."""
        cfg = self.cfg
        model_path = resolve_model_path(cfg)
        check_model(cfg, model_path, self.accelerator.num_processes, is_sharded(self.accelerator))
        sequence_parallel.check_heads(cfg, model_path)
        try:
            tokenizer = load_tokenizer(
                model_path, cfg.model.trust_remote_code, cfg.data.chat_template, self.say
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"model={cfg.model.model}: cannot load its tokenizer ({e})") from None
        check_special_tokens(cfg, tokenizer)
        return model_path, tokenizer

    def say(self, msg: str) -> None:
        rank0_print(self.accelerator, msg)

    def train(self) -> TrainResult:
        point = self.resume_point
        if point:
            self.checkpoints.load(point)
        self.metrics.start(point.step if point else None)
        self.samples.start(point.step if point else None)
        return self.evaluate_only() if self.cfg.train.eval_only else self._loop()

    def evaluate_only(self) -> TrainResult:
        """`eval_only` / `max_steps: 0`: the held-out metrics of the model (or resume's checkpoint), nothing saved."""
        step = self.checkpoints.progress.global_step
        self.log_eval(step)
        self.accelerator.end_training()
        self.say(f"eval only: step {step}; nothing trained or saved")
        return TrainResult(self.out, step, None, self.metrics.rows)

    def _loop(self) -> TrainResult:
        accelerator, t, progress = self.accelerator, self.cfg.train, self.checkpoints.progress
        if self.preempt.agreed(accelerator):  # a signal came during start-up: nothing new to save
            return self.preempted(progress.global_step, during="start-up")
        if t.eval_on_start and progress.global_step == 0 and t.eval_strategy != "no":
            self.log_eval(step=0)
        self.model.train()
        window, t0, stop = MetricWindow(self.beta), time.perf_counter(), False
        self.started, self.first_step = t0, progress.global_step
        steps = self.loader.steps(progress.epoch, progress.step_in_epoch, progress.global_step)
        with tqdm(total=self.total_steps, initial=progress.global_step, desc="orpo", dynamic_ncols=True,
                  disable=not accelerator.is_main_process) as bar:  # fmt: skip
            while progress.global_step < self.total_steps:
                grad_norm, health = self.optimizer_step(next(steps), window)
                progress.advance(self.loader.shards.steps_per_epoch)
                step, per_epoch = progress.global_step, self.loader.shards.steps_per_epoch
                epoch_end = progress.step_in_epoch == 0
                if cadence.logs(t, step, self.total_steps, epoch_end):
                    seconds = time.perf_counter() - t0
                    row = self.log_train(window, step, grad_norm, seconds)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", accuracy=f"{row['rewards/accuracies']:.2f}",
                                    tokens_s=f"{row['tokens_per_second']:.0f}", refresh=False)  # fmt: skip
                    if accelerator.is_main_process:  # one compact line per logged step, as TRL prints them
                        bar.write(f"[orpo_dist] {run_log.step_line(row)}")
                    t0 = time.perf_counter()
                elif accelerator.is_main_process:  # between logging steps: rank 0's running window
                    bar.set_postfix(**window.preview(), refresh=False)
                bar.update(1)
                if cadence.evaluates(t, step, per_epoch, epoch_end):
                    self.log_eval(step)
                # the step's one collective: a stop signal on any rank, a non-finite loss / grad norm on any rank
                stop, loss_bad, grad_bad = self.preempt.check(accelerator, health)
                if loss_bad or grad_bad:  # before any save: a non-finite value never becomes a checkpoint
                    raise self.health.error(step, loss_bad, self.out)
                saved = cadence.saves(t, step, per_epoch, epoch_end, self.total_steps)
                if saved or stop:
                    self.checkpoints.save(self.model)
                if stop:
                    break
        return self.preempted(progress.global_step) if stop else self.finish()

    def preempted(self, step: int, during: str = "") -> TrainResult:
        what = f"during {during}, nothing new to save" if during else "checkpoint saved"
        self.say(f"preempted: {what} at step {step}; exit {PREEMPTED_EXIT_CODE} (resume with --resume auto)")
        self.accelerator.end_training()  # trackers flushed and closed: the resumed run continues them
        return TrainResult(self.out, step, None, self.metrics.rows, preempted=True)

    def optimizer_step(
        self, batches: list[dict], window: MetricWindow
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Forward/backward over the step's micro-batches, then one optimizer step: the grad norm, and
        whether the loss / grad norm were finite (health.non_finite flags, not yet agreed across ranks)."""
        accelerator, cfg = self.accelerator, self.cfg
        # normalise by the whole step's token and pair counts, over all micro-batches and ranks,
        # so accumulation and data parallelism give the gradient of one big batch
        nll_tokens, pairs = all_sum(accelerator, sum(batch_counts(b) for b in batches)).tolist()
        # accelerate divides each micro-batch's loss by the accumulation, DDP / ZeRO average over ranks: undo both
        scale = len(batches) * gradient_average(accelerator)
        grad_norm, losses = None, 0.0
        for batch in batches:
            with accelerator.accumulate(self.model), accelerator.autocast():
                parts = self.forward(batch)
                loss = parts.loss(self.beta, nll_tokens, pairs) * scale
                accelerator.backward(loss)
                losses = losses + loss.detach()
                if accelerator.sync_gradients:  # max_grad_norm 0: measure the norm, don't clip
                    max_norm = cfg.train.max_grad_norm or math.inf
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add_step(parts, batch)
        self.scheduler.step()
        return grad_norm, non_finite(
            losses, grad_norm, grads_may_overflow=accelerator.mixed_precision == "fp16"
        )

    def log_train(self, window: MetricWindow, step: int, grad_norm, seconds: float) -> dict:
        epoch, lr = step / self.loader.shards.steps_per_epoch, self.scheduler.get_last_lr()[0]
        row = self.metrics.log_train(window, seconds, self.loader.take_wait_seconds(),
                                     step=step, epoch=epoch, learning_rate=lr, grad_norm=grad_norm)  # fmt: skip
        for warning in self.health.watch(row):
            self.say(warning)
        return row

    def forward(self, batch: dict) -> OrpoParts:
        inputs = model_inputs(batch, self.model)
        return forward_parts(
            self.model, self.lm_head, inputs, batch, self.cfg.orpo.logps_chunk_size, self.sp_reduce
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_loader is None:
            return {}
        self.model.eval()
        window = MetricWindow(self.beta)
        for batch in self.eval_loader.micro_batches(epoch=0):
            with self.accelerator.autocast():
                window.add_step(self.forward(batch), batch)
        self.model.train()
        out = window.reduce(self.accelerator, prefix="eval_")
        out.pop("eval_num_tokens")
        return out

    def log_eval(self, step: int) -> None:
        self.checkpoints.last_eval_step = step
        metrics = self.evaluate()
        if metrics:
            generated = self.samples(self.model, step)  # every rank: a barrier, or synced generation
            self.metrics.write({"step": step, **metrics, **generated})
            n = len(self.eval_loader.dataset)
            self.say(f"step {step}: held-out preference accuracy {metrics['eval_rewards/accuracies']:.3f} "
                     f"(eval_loss {metrics['eval_loss']:.4f}, {n} pairs)")  # fmt: skip
            if generated:
                self.say(f"step {step}: {self.samples.describe(generated)}")

    def finish(self) -> TrainResult:
        """Last eval, the final model, exports (rank 0 while the others wait), trackers closed."""
        accelerator, step, t = self.accelerator, self.checkpoints.progress.global_step, self.cfg.train
        seconds = time.perf_counter() - self.started  # training and its evals: not the save / export below
        if self.checkpoints.last_eval_step != step and t.eval_strategy != "no":
            self.log_eval(step)
        final = self.out / "final"
        self.checkpoints.save_model(self.model, final)
        accelerator.wait_for_everyone()
        failed = self.publish(final) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        if failed:
            raise failed
        accelerator.end_training()
        evals = [r["eval_rewards/accuracies"] for r in self.metrics.rows if "eval_rewards/accuracies" in r]
        if len(evals) >= 2:
            self.say(f"held-out preference accuracy: {evals[0]:.3f} before -> {evals[-1]:.3f} after")
        self.say(run_log.end_line(seconds, step - self.first_step, self.loader.shards.global_batch,
                                  self.metrics.tokens_trained, self.metrics.rows))  # fmt: skip
        for line in self.samples.summary(self.metrics.rows):
            self.say(line)
        self.say(f"done: {step} steps; final model in {final}")
        return TrainResult(self.out, step, final, self.metrics.rows)

    def publish(self, final: Path) -> Exception | None:
        """Rank 0, after training: exports (`<output_dir>/export/merged/`, `export/model-<quant>.gguf`),
        the Hub upload, and the report (report.md, report.png). Returns an export failure instead of
        raising it, so it is raised after the barrier and no rank is left waiting."""
        from orpo_dist.export import ExportError

        e, written, failed = self.cfg.export, {}, None
        if e.formats:
            from orpo_dist.export import export

            out = self.out / "export"
            try:
                written = export(final, out, e.formats, gguf_quant=e.gguf_quant, merged_dir=out / "merged",
                                 trust_remote_code=self.cfg.model.trust_remote_code)  # fmt: skip
            except Exception as err:  # noqa: BLE001
                failed = (
                    err
                    if isinstance(err, ExportError)
                    else ExportError(f"export failed ({type(err).__name__}: {err})")
                )
            for fmt, path in written.items():
                self.say(f"exported {fmt}: {path}")
        if e.push_to_hub and not failed:
            from orpo_dist.hub import push, retry_command

            try:
                self.say(f"pushed to the Hub: {push(self.cfg, final, written, self.hub_url)}")
            except Exception as err:  # noqa: BLE001 - the run is done: keep everything, say how to retry
                failed = ExportError(
                    f"upload to the Hub ({e.hub_model_id}) failed ({type(err).__name__}: {one_line(str(err))[:300]}); "
                    f"{final}, the exports and the report are kept; retry only the upload: {retry_command(self.out)}"
                )
        try:
            from orpo_dist.report import write_report

            write_report(self.out, say=self.say)
        except Exception as err:  # the report is a convenience: it never fails a finished run
            self.say(
                f"report not written ({type(err).__name__}: {err}); retry: python -m orpo_dist.report {self.out}"
            )
        return failed


def run(cfg: Config, signalled: Callable[[], bool] | None = None) -> TrainResult:
    """Train with a validated config. SIGUSR1 / SIGTERM stop it at a step boundary from here on
    (`signalled` reports one the caller caught earlier); the caller's handlers are restored after."""
    with Preemption(signalled) as preempt:
        return Trainer(cfg, preempt).train()


def exit_code(result: TrainResult) -> int:
    return PREEMPTED_EXIT_CODE if result.preempted else 0

"""wandb and tensorboard through accelerate, with the key names TRL / transformers dashboards use.

A metrics.jsonl row `{"step": 10, "loss": ..., "rewards/margins": ..., "eval_loss": ...}` reaches the
tracker as `train/loss`, `train/rewards/margins`, `eval/loss` (transformers' `rewrite_logs`), against
the step axis `train/global_step` (wandb: `define_metric`, as transformers' WandbCallback; tensorboard:
the event's step). metrics.jsonl keeps the flat names. Generated samples (samples.py) go to
`eval/samples`: a wandb Table, a tensorboard text.

wandb: the project is `wandb_project`, else $WANDB_PROJECT, else `orpo_dist`; $WANDB_ENTITY and
$WANDB_RUN_ID / $WANDB_RESUME are wandb's own. The first start writes the run id to
`<output_dir>/wandb_run_id`; a run that resumes (`resume: auto|latest|<path>`, e.g. a requeued SLURM job)
continues that wandb run. Without an API key wandb logs offline, and the notice names the run
directory and the `wandb sync` command that uploads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import Accelerator

from orpo_dist.config import Config, ConfigError
from orpo_dist.distributed import rank0_print

RUN_ID_FILE = "wandb_run_id"
STEP_KEY = "train/global_step"
SAMPLES_KEY = "eval/samples"  # samples.py's generated completions
SAMPLE_COLUMNS = ("step", "prompt", "completion", "chosen", "rejected")


PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}  # any one of them will do
WANDB_BAD_CHARS = "/\\#?%:"  # what wandb refuses in a project name (wandb_settings.validate_project)


def check_tracker(cfg: Config) -> None:
    """Before anything is loaded: the tracker's package is installed, and a wandb project / entity is a
    name wandb accepts (a ConfigError naming the fix otherwise)."""
    import importlib.util

    kind = cfg.train.log
    if kind not in PACKAGES:
        return
    if not any(_installed(name, importlib.util.find_spec) for name in PACKAGES[kind]):
        raise ConfigError(
            f"log: {kind} needs the {kind} package, which is not installed: pip install 'orpo-dist[{kind}]' "
            "(or set log: none)"
        )
    if kind != "wandb":
        return
    for what, value in (("project", cfg.train.wandb_project or os.environ.get("WANDB_PROJECT")),
                        ("entity", os.environ.get("WANDB_ENTITY"))):  # fmt: skip
        if not value:  # unset or empty: wandb's default
            continue
        # wandb's own rule for a project; an entity (a user or team name) also has no spaces
        bad = sorted({c for c in value if c in WANDB_BAD_CHARS or (what == "entity" and c.isspace())})
        if len(value) > 128 or bad:
            source = (
                "wandb_project" if what == "project" and cfg.train.wandb_project else f"WANDB_{what.upper()}"
            )
            why = f"contains {' '.join(map(repr, bad))}" if bad else "is over 128 characters"
            raise ConfigError(
                f"{source}={value!r} is not a valid wandb {what} name: it {why} (wandb refuses "
                f"{' '.join(WANDB_BAD_CHARS)} in a project, spaces in an entity, and over 128 characters); "
                "fix it, or unset it"
            )


def _installed(name: str, find_spec) -> bool:
    try:
        return find_spec(name) is not None
    except (ValueError, ImportError):  # sys.modules[name] = None, or a broken install
        return False


def tracker_row(row: dict) -> dict:
    """metrics.jsonl names -> the names TRL / transformers log (`train/...`, `eval/...`)."""
    from transformers.integrations.integration_utils import rewrite_logs

    return rewrite_logs({k: v for k, v in row.items() if k != "step"})


class Tracker:
    """The run's tracker (rank 0 only): started here, fed rows by MetricsLog."""

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator, self.kind = accelerator, cfg.train.log
        t, out = cfg.train, Path(cfg.train.output_dir)
        init_kwargs = {}
        if self.kind == "wandb":
            no_key = not os.environ.get("WANDB_API_KEY") and not _wandb_logged_in()
            no_key = no_key and "WANDB_MODE" not in os.environ
            if no_key:
                os.environ["WANDB_MODE"] = "offline"
            wandb_kwargs = {"name": t.run_name, "dir": str(out)}
            saved = out / RUN_ID_FILE
            if t.resume and saved.is_file() and not os.environ.get("WANDB_RUN_ID"):
                wandb_kwargs.update(
                    id=saved.read_text().strip(), resume=os.environ.get("WANDB_RESUME", "allow")
                )
            init_kwargs = {"wandb": wandb_kwargs}
        project = t.wandb_project or os.environ.get("WANDB_PROJECT") or "orpo_dist"
        accelerator.init_trackers(project, config=_flat_config(cfg), init_kwargs=init_kwargs)
        if self.kind == "wandb":
            self._wandb_started(out, no_key)
        else:
            logdir = Path(accelerator.get_tracker("tensorboard").logging_dir).resolve()
            rank0_print(accelerator, f"tensorboard: events in {logdir} (view: tensorboard --logdir {logdir})")

    def _wandb_started(self, out: Path, no_key: bool) -> None:
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        if run.settings.mode == "disabled":
            return
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        (out / RUN_ID_FILE).write_text(run.id)
        if run.offline:
            sync_dir = Path(run.settings.sync_dir).resolve()
            why = "no API key found" if no_key else "WANDB_MODE=offline"
            sync = f"wandb sync {sync_dir}"
            if run.resumed or len(list(sync_dir.parent.glob(f"offline-run-*-{run.id}"))) > 1:
                sync = f"wandb sync --id {run.id} {sync_dir.parent}/offline-run-*-{run.id} (every segment, in order)"
            rank0_print(
                self.accelerator,
                f"wandb: offline ({why}): run {run.id} in {sync_dir}; upload it with: {sync}",
            )
        else:
            rank0_print(self.accelerator, f"wandb: run {run.id}: {run.url}")

    def log(self, row: dict) -> None:
        values = tracker_row(row)
        if self.kind == "wandb":  # the step axis is train/global_step, so a resumed run never goes back
            self.accelerator.log({**values, STEP_KEY: row["step"]})
        else:
            self.accelerator.log(values, step=row["step"])

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Generated samples under `eval/samples`: a wandb Table, or a tensorboard text (a markdown table)."""
        if self.kind == "wandb":
            import wandb

            table = wandb.Table(
                columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows]
            )
            self.accelerator.log({SAMPLES_KEY: table, STEP_KEY: step})
        else:
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
            lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
            lines += ["| " + " | ".join(cell(r[c]) for c in SAMPLE_COLUMNS) + " |" for r in rows]
            self.accelerator.log({SAMPLES_KEY: "\n".join(lines)}, step=step)


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

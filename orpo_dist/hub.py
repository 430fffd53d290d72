"""`push_to_hub: true` + `hub_model_id`: upload the result to the Hugging Face Hub with huggingface_hub.

What is uploaded: the merged model (`<output_dir>/export/merged/`, with the GGUF files written beside
it) when `export` asks for one, else `final/` (the adapter, or the full model). The token is
huggingface_hub's own (`HF_TOKEN`, or what `hf auth login` stored); it is checked before training so a
missing one stops the run before hours are spent, and it is never written anywhere by orpo_dist.
"""

from __future__ import annotations

import os
from pathlib import Path

from orpo_dist.config import Config, ConfigError


def check_push(cfg: Config) -> None:
    """Before anything is loaded: a push at the end can work (ConfigError naming the fix otherwise)."""
    if not cfg.export.push_to_hub:
        return
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ConfigError("push_to_hub: true but HF_HUB_OFFLINE is set: unset it, or set push_to_hub: false")
    if not get_token():
        raise ConfigError(
            "push_to_hub: true needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
            "(or set push_to_hub: false)"
        )


def open_repo(cfg: Config) -> str | None:
    """Before training, with the network on (rank 0): the token is accepted and the repo exists or is
    created (as transformers' Trainer does); its URL. A refused token or repo is a ConfigError naming the
    fix; a network error is raised as it is (one line from the command line, exit 1)."""
    if not cfg.export.push_to_hub:
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = cfg.export.hub_model_id
    try:
        return str(HfApi().create_repo(repo_id, exist_ok=True, repo_type="model"))
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise ConfigError(
                f"push_to_hub: the Hugging Face token was refused (401) opening {repo_id}: set a valid HF_TOKEN "
                "or run `hf auth login`"
            ) from None
        if status in (403, 404, 409):
            raise ConfigError(
                f"push_to_hub: cannot create or open the repo {repo_id} ({status}): use a token with write access "
                "to it, or a hub_model_id under your own namespace"
            ) from None
        raise


def push(cfg: Config, final: Path, exported: dict[str, Path], url: str | None = None) -> str:
    """Upload the merged model (and GGUF files) if exported, else final/; returns the repo URL.
    `url`: the repo open_repo opened before training (else it is opened here)."""
    from huggingface_hub import HfApi

    api, repo_id = HfApi(), cfg.export.hub_model_id
    url = url or api.create_repo(repo_id, exist_ok=True, repo_type="model")
    gguf = exported.get("gguf")
    folder = exported.get("merged_16bit") or (gguf.parent if gguf else final)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message="orpo_dist: ORPO-trained model"
    )
    if gguf and gguf.parent != Path(folder):
        api.upload_file(path_or_fileobj=str(gguf), path_in_repo=gguf.name, repo_id=repo_id)
    return str(url)


def retry_command(out: Path) -> str:
    return f"python -m orpo_dist.hub {out}"


def push_run(out: Path) -> str:
    """Upload what a finished run wrote (its config.yaml names the repo): the retry after a failed upload."""
    from orpo_dist.config import load_config

    out = Path(out)
    if not (out / "config.yaml").is_file() or not (out / "final").is_dir():
        raise ConfigError(f"{out} is not a finished run (no config.yaml and final/): pass a run's output_dir")
    cfg = load_config(out / "config.yaml")
    if not cfg.export.hub_model_id:
        raise ConfigError(f"{out}/config.yaml has no hub_model_id: nothing says where to upload")
    cfg.export.push_to_hub = True
    check_push(cfg)
    merged, gguf = out / "export" / "merged", sorted((out / "export").glob("model-*.gguf"))
    exported = {"merged_16bit": merged} if (merged / "config.json").is_file() else {}
    if gguf:
        exported["gguf"] = gguf[0]
    return push(cfg, out / "final", exported)


def main(argv: list[str] | None = None) -> int:
    """`python -m orpo_dist.hub OUTPUT_DIR`: upload a finished run again (only the upload)."""
    import argparse
    import sys

    from orpo_dist.exits import guarded

    parser = argparse.ArgumentParser(prog="python -m orpo_dist.hub", description=main.__doc__)
    parser.add_argument("output_dir", help="a finished run's output_dir (config.yaml names hub_model_id)")
    args = parser.parse_args(argv)
    return guarded(
        lambda: (
            print(f"[orpo_dist] pushed to the Hub: {push_run(Path(args.output_dir))}", file=sys.stdout) or 0
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())

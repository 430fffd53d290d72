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


def push(cfg: Config, final: Path, exported: dict[str, Path]) -> str:
    """Upload the merged model (and GGUF files) if exported, else final/; returns the repo URL."""
    from huggingface_hub import HfApi

    api, repo_id = HfApi(), cfg.export.hub_model_id
    url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
    gguf = exported.get("gguf")
    folder = exported.get("merged_16bit") or (gguf.parent if gguf else final)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message="orpo_dist: ORPO-trained model"
    )
    if gguf and gguf.parent != Path(folder):
        api.upload_file(path_or_fileobj=str(gguf), path_in_repo=gguf.name, repo_id=repo_id)
    return str(url)

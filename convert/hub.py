"""Sharing a converted folder on the Hugging Face Hub (or showing what would be shared)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from .errors import ConvertError
from .quality import human_bytes


def files_to_upload(folder: Path) -> List[Path]:
    """Every file `upload_folder` would send, relative to `folder`, sorted."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def dry_run_text(folder: Path, repo_id: str) -> str:
    """What an upload of `folder` to `repo_id` would send, with sizes, followed by the model card."""
    files = files_to_upload(folder)
    total = sum((folder / f).stat().st_size for f in files)
    lines = [f"dry run: would upload {len(files)} files ({human_bytes(total)}) to https://huggingface.co/{repo_id}"]
    lines += [f"  {f}  {(folder / f).stat().st_size} bytes" for f in files]
    card = folder / "README.md"
    if card.is_file():
        lines += ["", "model card (README.md):", card.read_text()]
    return "\n".join(lines)


def token_for(api: Optional[Any], repo_id: str) -> str:
    """The token an upload to `repo_id` would use (the API object's, else huggingface_hub's
    usual sources); ConvertError when the repo id is malformed or there is no token."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConvertError(f"--upload-repo '{repo_id}' must be ORG/NAME, e.g. mlx-community/gemma-4-e2b-it-4bit")
    token = getattr(api, "token", None)
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise ConvertError(
            "no Hugging Face token found; run `hf auth login` or set HF_TOKEN, "
            "or use --dry-run to see what would be uploaded"
        )
    return token


def upload(folder: Path, repo_id: str, *, api: Optional[Any] = None, private: bool = False,
           revision: Optional[str] = None) -> str:
    """Create `repo_id` if needed and upload `folder`; returns the commit URL.

    `api` is an `huggingface_hub.HfApi`-like object (tests inject a recorder);
    the token comes from the usual huggingface_hub sources (HF_TOKEN, `hf auth login`).
    """
    token = token_for(api, repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision, token=token,
            commit_message="Upload converted Gemma 4 model (mlx_gemma4.convert)",
        )
    except Exception as e:  # huggingface_hub raises many types; one line is enough
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"upload to {repo_id} failed ({type(e).__name__}: {reason}); the converted folder is kept at {folder}"
        ) from None
    return str(getattr(commit, "commit_url", commit))

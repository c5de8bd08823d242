"""The Hugging Face hub, read through huggingface_hub's own cache resolution: a hub id (`org/name`) becomes the
local folder of its snapshot in the HF cache (`HF_HUB_CACHE`), downloaded only where the user allows it (a
`allow_download` setting, and HF_HUB_OFFLINE unset). Models (distgen.models.loading) and datasets
(distgen.inputs.source) both resolve their ids here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from distgen.common.errors import ConfigError

# A Hugging Face hub id: `name` or `org/name` (letters, digits, . _ -).
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def names_hub_id(value: Optional[str]) -> bool:
    """Whether a model or dataset path is to be read as a hub id: no file or folder here has that name, and it has
    the form of one (a relative path such as ./x never does)."""
    return bool(value) and not Path(value).exists() and not value.startswith(".") and bool(HUB_ID.match(value))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(key: str, repo_id: str, revision: Optional[str], allow_download: bool, repo_type: str = "model") -> str:
    """The local folder of hub repository `repo_id` (a model or a dataset) at `revision`: from the HF cache, or
    downloaded where allowed. Not there: a ConfigError naming `key`, the cache folder and how to fetch it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    section = key.split(".")[0]
    at = f" at {section}.revision={revision}" if revision else ""
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                 local_files_only=offline() or not allow_download)
    except LocalEntryNotFoundError as err:
        allow = f"{section}.allow_download=true"
        if offline():
            why, other = "HF_HUB_OFFLINE is set", f"unset HF_HUB_OFFLINE{'' if allow_download else ' and give ' + allow}"
        elif allow_download:  # allowed, and the hub did not answer
            why, other = f"the hub could not be reached ({str(err).splitlines()[0].removeprefix('Got: ')})", ""
        else:
            why, other = f"downloads are off ({section}.allow_download=false)", f"give {allow}"
        dataset = repo_type == "dataset"
        fetch = " ".join(["hf download", repo_id, *(["--repo-type dataset"] if dataset else []),
                          *([f"--revision {revision}"] if revision else [])])
        raise ConfigError(f"{key}={repo_id!r} is neither a {'file or folder' if dataset else 'folder'} here "
                          f"({os.getcwd()}) nor a {repo_type}{at} in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                          f"and {why}; fetch it with `{fetch}`{f' (or {other})' if other else ''}") from None
    except HFValidationError as err:
        raise ConfigError(f"{key}={repo_id!r} is not allowed: not a {'file or ' if repo_type == 'dataset' else ''}"
                          f"folder, and not a hub id ({str(err).splitlines()[0]})") from None
    except Exception as err:  # the hub's HTTP errors: repository, revision or gated access
        raise ConfigError(f"{key}={repo_id!r}{at} could not be fetched from the hub: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None


def hub_name(folder: str | None) -> str | None:
    """The hub id (`org/name`) whose Hugging Face cache snapshot `folder` is, or None."""
    if hub_commit(folder) is None:
        return None
    return Path(folder).absolute().parent.parent.name.split("--", 1)[1].replace("--", "/")


def hub_commit(folder: str | None) -> str | None:
    """The commit a Hugging Face cache snapshot folder holds (`.../models--org--name/snapshots/<commit>`, or
    `datasets--org--name`), or None."""
    if not folder:
        return None
    path = Path(folder).absolute()
    cached = path.parent.name == "snapshots" and path.parent.parent.name.startswith(("models--", "datasets--"))
    return path.name if cached else None

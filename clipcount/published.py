"""`--model published`: the released CLIP-Count checkpoint, downloaded, converted and cached on first use.

First use: the checkpoint is downloaded from the link in the published README (Google Drive, through
`gdown`, which handles that host's confirmation pages), the CLIP weights it lacks come from OpenAI's
ViT-B/16 on the Hugging Face hub (its own cache), and `convert-official` turns both into one clipcount
checkpoint folder in the user's cache (platformdirs). Later uses find that folder and need no network.

Nothing half-written is ever trusted: the download goes to a private staging folder and is moved next
to the cache only once complete and readable; the converted folder appears by one rename of a
finished folder. A killed run leaves only a staging folder, which later runs ignore and remove.

Environment:
    CLIPCOUNT_PUBLISHED_URL   where to download the checkpoint from (a mirror; any http(s) URL)
    CLIPCOUNT_PUBLISHED_CLIP  CLIP weights to use instead of the hub's (file, folder or hub id)
    CLIPCOUNT_CACHE           cache folder (default: the platform's user cache folder for clipcount)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from clipcount.errors import CheckpointError

DRIVE_ID = "17Dj0tjd29lPGOGYEF5IrE8aPClXUjTrR"  # the "pre-trained ckpt" link of the published README
PUBLISHED_URL = f"https://drive.google.com/uc?id={DRIVE_ID}"
PUBLISHED_PAGE = f"https://drive.google.com/file/d/{DRIVE_ID}/view"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"  # what the published code loads (OpenAI's ViT-B/16)
URL_ENV = "CLIPCOUNT_PUBLISHED_URL"
CLIP_ENV = "CLIPCOUNT_PUBLISHED_CLIP"
CACHE_ENV = "CLIPCOUNT_CACHE"

_NAME = "published"
_CKPT_NAME = "clip-count-published.ckpt"
_STAGING_PREFIX = f".{_NAME}.tmp-"


def cache_root() -> Path:
    """clipcount's cache folder: $CLIPCOUNT_CACHE, else the platform's user cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("clipcount", appauthor=False))


def published_folder() -> Path:
    """Where the converted published model lives (model.safetensors + config.json)."""
    return cache_root() / "models" / _NAME


def is_cached() -> bool:
    from clipcount.modeling.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    folder = published_folder()
    return (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file()


def ensure_published(progress: bool = True) -> Path:
    """The converted published model's folder; downloaded and converted first if not cached."""
    folder = published_folder()
    if is_cached():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=folder.parent))
    try:
        ckpt = _checkpoint_file(staging, progress)
        _say(progress, f"converting it to clipcount's format in {folder} (once)")
        _convert(ckpt, staging / "model", progress)
        _publish(staging / "model", folder)
        ckpt.unlink(missing_ok=True)  # everything it held is in the converted folder now
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _checkpoint_file(staging: Path, progress: bool) -> Path:
    """A complete, readable published checkpoint: kept from an earlier try, or downloaded now."""
    from clipcount.modeling.official import load_official_file

    kept = published_folder().parent / _CKPT_NAME
    if kept.is_file():
        return kept
    url = os.environ.get(URL_ENV) or PUBLISHED_URL
    partial = staging / _CKPT_NAME
    _say(progress, f"downloading the published CLIP-Count checkpoint from {url} (first use only)")
    _download(url, partial, progress)
    try:
        load_official_file(partial)
    except CheckpointError as error:
        raise CheckpointError(f"the file downloaded from {url} is not a usable checkpoint ({error}); "
                              f"try again, or set {URL_ENV} to a mirror") from None
    os.replace(partial, kept)  # only a complete, readable download ever gets this name
    return kept


def _download(url: str, out: Path, progress: bool) -> None:
    try:
        import gdown
    except ImportError:
        raise CheckpointError("downloading the published model needs gdown: pip install gdown") from None
    try:
        result = gdown.download(url, str(out), quiet=not progress, use_cookies=False)
    except Exception as error:  # noqa: BLE001 - requests, gdown and OS errors all mean the same here
        raise CheckpointError(offline_message(url, error)) from None
    if result is None or not out.is_file():
        raise CheckpointError(offline_message(url, None))


def offline_message(url: str, error: BaseException | None) -> str:
    """One line: what failed and the manual steps that replace the download."""
    why = f" ({type(error).__name__})" if error is not None else ""
    return (
        f"the published model is not downloaded yet and {url} could not be fetched{why}; to set it up by hand, "
        f"download the checkpoint ({PUBLISHED_PAGE}) and OpenAI's ViT-B/16 (huggingface.co/{DEFAULT_CLIP}), run "
        f"`clipcount convert-official CKPT {published_folder()} --clip CLIP`, then use --model published "
        f"(or set {URL_ENV} to a mirror)"
    )


def _convert(ckpt: Path, out: Path, progress: bool) -> None:
    from clipcount.modeling.official import convert_official

    clip = os.environ.get(CLIP_ENV) or DEFAULT_CLIP
    try:
        convert_official(ckpt, out, clip=clip, say=lambda message: _say(progress, message))
    except CheckpointError as error:
        raise CheckpointError(f"{error} (for the published model, set {CLIP_ENV} to OpenAI's ViT-B/16 weights: "
                              f"a file, a folder or a hub id; the checkpoint downloaded is kept at {ckpt} for the "
                              "next try, delete it to download it again)") from None


def _publish(staging: Path, folder: Path) -> None:
    """Move a finished folder into place in one rename; a folder another process published wins."""
    try:
        os.rename(staging, folder)
    except OSError:
        if not is_cached():
            raise


def _remove_stale_staging(parent: Path) -> None:
    """Staging folders of processes that no longer run (killed mid-download) are never trusted."""
    for path in parent.glob(f"{_STAGING_PREFIX}*"):
        pid = path.name[len(_STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave it alone
    return True


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"clipcount: {message}", file=sys.stderr, flush=True)

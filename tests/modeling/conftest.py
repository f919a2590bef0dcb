"""The published checkpoint rebuilt by the reference rule, in the forms people meet (written once)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

from .official_rule import REFERENCE, rule_state, without_clip, write_checkpoint, write_clip_folder

HAVE_REFERENCE = (REFERENCE / "compat").is_dir()


@pytest.fixture(scope="session")
def rule_files(tmp_path_factory) -> SimpleNamespace:
    """full: all 841 keys (Namespace hyper_parameters); released: the ~85 keys the published run.py
    saves (dict hyper_parameters); clip_folder: the rule's CLIP as an OpenCLIP folder, and clip_file
    its bare OpenAI-layout weights file. All made with decoder_head=4, as the compat vectors were."""
    if not HAVE_REFERENCE:
        pytest.skip("shared/reference/compat is not beside the checkout")
    tmp: Path = tmp_path_factory.mktemp("published-rule")
    state = rule_state()
    released = without_clip(state)
    files = SimpleNamespace(
        tmp=tmp,
        released_state=released,
        full=write_checkpoint(tmp / "full.ckpt", state, argparse.Namespace(lr=1e-4, decoder_head=4), epoch=3),
        released=write_checkpoint(tmp / "released.ckpt", released,
                                  {"decoder_head": 4, "backbone": "b16", "vpt_width": 20, "vpt_depth": 10,
                                   "coop_width": 2, "use_vpt": True, "use_coop": True, "use_mixed_fim": True,
                                   "use_fim": False, "unfreeze_vit": False, "lr": 1e-4}),
        clip_folder=write_clip_folder(tmp / "clip-vit-b16", state),
    )
    files.clip_file = files.clip_folder / "open_clip_pytorch_model.bin"
    del state
    return files

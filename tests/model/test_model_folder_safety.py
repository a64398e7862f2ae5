"""Loading a saved CnC / GLoD folder runs no code from it: classes resolve by name from diffusers,
transformers and cnc_model only; folders saved before the modules moved still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cnc_model.cnc.pipeline_cnc import CnCPipeline
from cnc_model.glod.pipeline_glod import GLoDPipeline
from cnc_model.loading import load_pipeline
from cnc_model.tiny import tiny_sd_components
from tests.model.conftest import make_cnc_pipeline, random_depth, random_image

# the names a folder saved before cnc_model/ was grouped by role carries
OLD_NAMES = {"local_fuser": ["cnc_model.local_fuser", "LocalFuser"],
             "global_fuser": ["cnc_model.global_fuser", "GlobalFuser"]}


def _generate(pipe: CnCPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cube on a table", fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2),
                fg_exemplar=random_image((40, 40), 1), bg_exemplar=random_image((40, 40), 2),
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def _edit_index(folder: Path, **entries: object) -> None:
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(entries)
    path.write_text(json.dumps(index))


def _to_pre_move_layout(folder: Path, cls_name: str, module: str) -> None:
    (folder / f"{module}.py").write_text(
        f'"""Lets `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` find {cls_name}."""\n'
        f"from cnc_model.{module} import {cls_name}  # noqa: F401\n")
    extra = OLD_NAMES if cls_name == "CnCPipeline" else {}
    _edit_index(folder, _class_name=[module, cls_name], **extra)


@pytest.fixture(scope="module")
def saved_cnc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    pipe = make_cnc_pipeline(randomize_zero_convs=True)
    folder = tmp_path_factory.mktemp("cnc")
    pipe.save_pretrained(folder)
    return folder, _generate(pipe)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_folder_saved_before_the_move_loads_and_generates_the_same_image(saved_cnc, tmp_path):
    folder, want = saved_cnc
    old = _copy(folder, tmp_path / "old")
    _to_pre_move_layout(old, "CnCPipeline", "pipeline_cnc")
    assert np.array_equal(_generate(CnCPipeline.from_pretrained(old)), want)
    assert np.array_equal(_generate(load_pipeline(old)), want)


def test_a_glod_folder_saved_before_the_move_loads(tmp_path):
    pipe = GLoDPipeline(**tiny_sd_components(0))
    pipe.save_pretrained(tmp_path)
    _to_pre_move_layout(tmp_path, "GLoDPipeline", "pipeline_glod")
    loaded = GLoDPipeline.from_pretrained(tmp_path)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def _crafted(saved: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A copy of a saved folder whose index points at a module that writes a marker file."""
    folder, marker = _copy(saved, tmp_path / "crafted"), tmp_path / "marker"
    code = MARKER_CODE.format(marker=str(marker)) + "class CnCPipeline: pass\nclass LocalFuser: pass\n"
    if how == "shim_replaced":  # the index names the project's module file, whose text is foreign
        (folder / "pipeline_cnc.py").write_text(code)
    elif how == "pipeline_module":
        (folder / "evil.py").write_text(code)
        _edit_index(folder, _class_name=["evil", "CnCPipeline"])
    elif how == "component_module":
        (folder / "local_fuser" / "evil.py").write_text(code)
        _edit_index(folder, local_fuser=["evil", "LocalFuser"])
    elif how == "installed_module":
        _edit_index(folder, local_fuser=["os", "system"])
    elif how == "unknown_project_class":
        _edit_index(folder, local_fuser=["cnc_model.local_fuser", "Evil"])
    return folder, marker


@pytest.mark.parametrize("how", ["pipeline_module", "component_module", "installed_module", "unknown_project_class"])
def test_a_folder_naming_a_foreign_module_is_a_one_line_error_and_runs_nothing(saved_cnc, tmp_path, how):
    folder, marker = _crafted(saved_cnc[0], tmp_path, how)
    with pytest.raises(ValueError) as info:
        CnCPipeline.from_pretrained(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    with pytest.raises(ValueError):
        load_pipeline(folder)
    assert not marker.exists()


def test_the_module_file_in_the_folder_is_never_imported(saved_cnc, tmp_path):
    folder, marker = _crafted(saved_cnc[0], tmp_path, "shim_replaced")
    assert np.array_equal(_generate(CnCPipeline.from_pretrained(folder)), saved_cnc[1])
    with pytest.raises(ValueError, match="no remote code"):
        CnCPipeline.from_pretrained(folder, trust_remote_code=True)
    assert not marker.exists()

"""Config files read by path (echoclip_jax.config.files), as the commands' --config reads them."""

import pathlib

import pytest

from echoclip_jax.config import files

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"


def test_load_applies_overrides_and_presets_start_from_their_sibling():
    tiny = files.load(CONFIGS / "tiny.py", {"batch_size": 8, "model.vision.image_size": 32})
    assert tiny.batch_size == 8 and tiny.model.vision.image_size == 32 and tiny.model.vision.variant == "atto"
    echoclip, echoclip_r = files.load(CONFIGS / "echoclip.py"), files.load(CONFIGS / "echoclip_r.py")
    assert echoclip_r.batch_size == echoclip.batch_size == 1024 and echoclip_r.model.dtype == "bfloat16"
    assert echoclip_r.tokenizer.name == "template" and echoclip.tokenizer.name == "clip_bpe"


def test_bad_paths_and_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="no field 'batch_sizes'"):
        files.load(CONFIGS / "tiny.py", {"batch_sizes": 8})
    with pytest.raises(FileNotFoundError, match="nope.py: no such config file"):
        files.load(tmp_path / "nope.py")
    with pytest.raises(ValueError, match="gs://b/c.py: a config file is Python code, read from local disk"):
        files.load("gs://b/c.py")
    (tmp_path / "x.py").write_text("A = 1\n")
    with pytest.raises(ValueError, match="defines get_config"):
        files.load(tmp_path / "x.py")

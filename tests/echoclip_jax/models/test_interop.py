"""Weight parity with open_clip (PyTorch) in both directions, and parameter counts."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import pathlib

from echoclip_jax.config import files
from echoclip_jax.weights import conversion
from echoclip_jax.weights import loader as weights
from echoclip_jax.weights import open_clip as ocw

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"

pytestmark = pytest.mark.interop


def randomised_open_clip(model_config, seed=0):
    """An open_clip model (eval mode) with random weights, layer scales and norms included."""
    torch.manual_seed(seed)
    m = open_clip.CLIP(**ocw.open_clip_model_cfg(model_config))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma") or "norm" in name or "ln" in name:
                p.normal_(0.0, 0.5)
    return m.eval()


def open_clip_embeddings(m, images, tokens):
    with torch.no_grad():
        img = m.encode_image(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2)), normalize=True)
        txt = m.encode_text(torch.from_numpy(np.asarray(tokens).astype(np.int64)), normalize=True)
    return img.numpy(), txt.numpy()


def assert_close(ours, theirs):
    rel = np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs))
    assert rel < 1e-5, rel


def check_parity(model_config, torch_model, tmp_path):
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = ocw.import_state_dict(sd, weights.expected_params(model_config), model_config, "test")
    assert sum(v.size for v in params.values()) == sum(p.numel() for p in torch_model.parameters())
    ours = weights.make_model(model_config, params)
    images, tokens = conversion.fixed_inputs(model_config)
    theirs = open_clip_embeddings(torch_model, images, tokens)
    assert_close(ours.encode_image(images), theirs[0])
    assert_close(ours.encode_text(tokens), theirs[1])
    # the other direction: export ours, let open_clip's own factory load it
    ocw.write_open_clip_dir(params, model_config, str(tmp_path / "export"))
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    loaded.eval()
    back = open_clip_embeddings(loaded, images, tokens)
    assert_close(ours.encode_image(images), back[0])
    assert_close(ours.encode_text(tokens), back[1])


def test_small_convnext_parity_both_directions(tmp_path):
    mc = files.load(CONFIGS / "tiny.py").model
    mc.vision.image_size = 64
    check_parity(mc, randomised_open_clip(mc), tmp_path)


def test_eos_pooled_text_tower_exports_pool_type(tmp_path):
    mc = files.load(CONFIGS / "tiny.py").model
    mc.text.vocab_size, mc.text.pool, mc.text.eos_id = 909, "eos", 908
    cfg = ocw.open_clip_model_cfg(mc)
    assert cfg["text_cfg"]["pool_type"] == "eos" and cfg["text_cfg"]["eos_id"] == 908
    back = ocw.model_config_from_open_clip(json.loads(json.dumps(cfg)))
    assert (back.text.pool, back.text.eos_id, back.vision.variant) == ("eos", 908, "atto")


def test_state_dict_mismatch_names_the_key():
    mc = files.load(CONFIGS / "tiny.py").model
    sd = {k: v.numpy() for k, v in randomised_open_clip(mc).state_dict().items()}
    del sd["visual.trunk.stem.0.weight"]
    sd["token_embedding.weight"] = sd["token_embedding.weight"][:100]
    with pytest.raises(ValueError, match=r"^src\.bin: ") as err:
        ocw.import_state_dict(sd, weights.expected_params(mc), mc, "src.bin")
    assert "missing visual.trunk.stem.0.weight" in str(err.value)
    assert "token_embedding.weight: shape (100, 128)" in str(err.value)


@pytest.fixture(scope="module")
def convnext_base():
    mc = files.load(CONFIGS / "echoclip.py").model
    mc.dtype = "float32"
    return mc, randomised_open_clip(mc)


def test_echoclip_config_has_open_clip_convnext_base_parameter_count(convnext_base):
    mc, m = convnext_base
    ref = open_clip.create_model("convnext_base")
    n = sum(p.numel() for p in ref.parameters())
    assert n == sum(p.numel() for p in m.parameters())
    assert n == sum(int(np.prod(s.shape)) for s in weights.expected_params(mc).values())
    assert 151e6 < n < 152e6


@pytest.mark.slow  # builds and runs the 151.5M-parameter model in both frameworks
def test_convnext_base_parity_both_directions(convnext_base, tmp_path):
    mc, m = convnext_base
    check_parity(mc, m, tmp_path)

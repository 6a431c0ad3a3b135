"""One config check at start-up: every shipped config passes; each wrong value is named with what would fit."""

import os
import pathlib
import subprocess
import sys

import pytest

from echoclip_jax.config import defaults as base
from echoclip_jax.config import files
from echoclip_jax.config.validation import ConfigError, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"

TEMPLATE_VOCAB = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "..", "shared", "echoclip_reference", "template_vocab.txt"
)


def test_shipped_configs_pass():
    validate(base.get_base_config(), num_devices=8, num_processes=1)
    validate(files.load(CONFIGS / "tiny.py"), num_devices=8, num_processes=1)
    c = files.load(CONFIGS / "echoclip.py")  # the recipe starts from LAION weights, which the user names
    with pytest.raises(
        ConfigError, match="init.path = '': init.kind 'open_clip' needs the weights: set --config.init.path=PATH"
    ):
        validate(c, num_devices=8)
    validate(c, training=False)  # commands that only run a model do not need them
    c.init.path = "/weights/laion_convnext_base.bin"
    validate(c, num_devices=256, num_processes=64)  # batch 1024 over a v5e-256 slice


def test_echoclip_r_passes_with_its_vocabulary_and_names_the_missing_file():
    c = files.load(CONFIGS / "echoclip_r.py")
    with pytest.raises(ConfigError, match="tokenizer.path = '': the template tokenizer needs its vocabulary file"):
        validate(c, num_devices=8)
    c.tokenizer.path = TEMPLATE_VOCAB
    validate(c, num_devices=8)
    c.model.text.eos_id = 907
    with pytest.raises(
        ConfigError,
        match="model.text.eos_id = 907: the template tokenizer ends texts with id 908; set model.text.eos_id=908",
    ):
        validate(c, num_devices=8)


def test_tokenizer_against_the_text_tower():
    c = files.load(CONFIGS / "tiny.py")
    c.tokenizer.context_length = 64
    with pytest.raises(ConfigError, match="tokenizer.context_length = 64: must equal model.text.context_length 77"):
        validate(c, num_devices=8)
    c = files.load(CONFIGS / "tiny.py")
    c.model.text.vocab_size = 1000
    with pytest.raises(ConfigError, match="model.text.vocab_size = 1000: the clip_bpe tokenizer has 49408 ids"):
        validate(c, num_devices=8)
    c = files.load(CONFIGS / "echoclip_r.py")  # template ids end at EOS 908; a larger embedding breaks argmax pooling
    c.tokenizer.path, c.model.text.pool, c.model.text.vocab_size = TEMPLATE_VOCAB, "argmax", 1024
    with pytest.raises(
        ConfigError,
        match="model.text.pool = 'argmax': 'argmax' pools the highest id.*set "
        "model.text.pool=eos and model.text.eos_id=908",
    ):
        validate(c, num_devices=8)


def test_batch_against_devices_accumulation_and_processes():
    c = files.load(CONFIGS / "tiny.py")
    c.batch_size, c.optim.grad_accum_steps = 36, 3  # micro-batches of 12 over 8 devices
    with pytest.raises(
        ConfigError,
        match=r"batch_size = 36: each of the 3 micro-batch\(es\) \(12\) must split over "
        r"the 8 data x fsdp devices: use a multiple of 24 \(e.g. 48\)",
    ):
        validate(c, num_devices=8)
    c.batch_size = 48
    validate(c, num_devices=8)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 4  # the batch splits over data x fsdp = 2 only
    c.batch_size, c.optim.grad_accum_steps = 6, 1
    validate(c, num_devices=8)
    with pytest.raises(ConfigError, match="batch_size = 6: must split over the 4 processes"):
        validate(c, num_devices=8, num_processes=4)
    c.optim.grad_accum_steps = 4
    with pytest.raises(ConfigError, match="optim.grad_accum_steps = 4: must divide batch_size 6"):
        validate(c, num_devices=8)
    c.optim.grad_accum_steps, c.mesh.data = 1, 3
    with pytest.raises(ConfigError, match="mesh = .*must use all 8 devices"):
        validate(c, num_devices=8)


def test_every_problem_in_one_message():
    c = files.load(CONFIGS / "tiny.py")
    c.model.dtype, c.loss.name, c.sharding_preset, c.total_steps = "float16", "softmax", "zero3", 0
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=8)
    msg = str(e.value)
    for part in (
        "model.dtype = 'float16': expected one of 'float32', 'bfloat16'",
        "loss.name = 'softmax': expected one of 'clip', 'siglip'",
        "sharding_preset = 'zero3': expected one of 'dp', 'fsdp', 'fsdp_tp'",
        "total_steps = 0: must be a positive number",
    ):
        assert part in msg, msg
    c = files.load(CONFIGS / "tiny.py")
    c.model.text.heads, c.loss.name = 7, "siglip"
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=8)
    assert "model.text.heads = 7: must divide model.text.width" in str(e.value)
    assert "model.init_logit_bias = None: the siglip loss needs a logit bias" in str(e.value)


def test_inference_commands_check_model_and_tokenizer_only():
    c = files.load(CONFIGS / "tiny.py")
    c.loss.name, c.batch_size = "softmax", 3  # training-only fields: not an inference command's concern
    validate(c, training=False)
    c.model.vision.variant = "huge"
    with pytest.raises(ConfigError, match="model.vision.variant = 'huge': convnext variants are atto, base"):
        validate(c, training=False)


def test_train_cli_names_the_field_and_exits_before_reading_anything(tmp_path):
    repo = os.path.join(os.path.dirname(__file__), "..", "..", "..")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "echoclip_jax.train",
            "--config",
            os.path.join(repo, "configs", "tiny.py"),
            "--config.batch_size=12",
            "--config.data_dir=/nonexistent",
            "--workdir",
            str(tmp_path / "w"),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]  # a config refused: usage
    assert (
        "echoclip_jax.train: error: config: batch_size = 12: each of the 1 micro-batch(es) (12) must split over the 8"
        in r.stderr
    )

"""echoclip-jax: the training system for EchoCLIP-style echocardiography foundation models.

Versions are pinned exactly: JAX, Flax, Orbax and grain rename APIs at minor releases, so upgrades are
deliberate and guarded by the tests.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "sentencepiece==0.2.3",
    "pydicom==3.0.2",
    "pillow==12.3.0",
    "pylibjpeg==2.1.0",
    "pylibjpeg-openjpeg==2.6.0",
    "pylibjpeg-rle==2.2.0",
    "safetensors==0.8.0",
    "tensorflow-datasets==4.9.10",
    "tensorboardX==2.6.5",
    "protobuf==6.33.6",
    "matplotlib==3.11.2",
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
    "tqdm==4.70.1",
    "google-crc32c==1.9.0",
    "av==18.1.0",
    "absl-py==2.5.1",
    "pyarrow==25.0.1",
    "python-dateutil==2.9.0.post0",
    "ftfy==6.3.1",
    "regex==2026.11.15",
    "phonenumbers==9.0.43",
    "faiss-cpu==1.15.1",  # echoclip_jax.search: exact and IVF vector search
]

EXTRAS = {
    "test": ["pytest==9.2.0", "hypothesis==6.170.15", "pydicom-data==1.0.0", "ruff==0.17.6"],
    # PyTorch + open_clip: weight-layout and tokenizer parity tests, and open_clip export checks.
    "interop": ["torch==2.14.1", "torchvision==0.29.1", "open-clip-torch==3.3.0"],
    "beam": ["apache-beam==2.77.0"],
    "tf": ["tensorflow-cpu==2.20.0"],
    # Compile-only TPU topologies for `python -m echoclip_jax.aot` (no TPU needed); the libtpu that jax's own
    # `tpu` extra pins for jax 0.10.2. On a TPU VM the same package runs the chips.
    "tpu": ["libtpu==0.0.42.1"],
}

setup(
    name="echoclip-jax",
    version="0.1.0",
    description="Training, evaluation and conversion for EchoCLIP-style echocardiography CLIP models in JAX/Flax",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["echoclip_jax", "echoclip_jax.*", "data_prep", "data_prep.*"]),
    package_data={"echoclip_jax": ["tokenizers/*.gz", "tokenizers/LICENSE*", "config/*.json"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

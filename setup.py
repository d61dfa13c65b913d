from pathlib import Path

from setuptools import find_packages, setup

PEERS = ["timm", "torchvision==0.29.1", "transformers"]

setup(
    name="vitriton",
    version="0.1.0",
    description="Fused Triton kernels for Vision Transformers: attention and patch projection, "
    "exact against an einsum reference, swapped into timm, torchvision and Hugging Face ViTs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["kernels", "kernels.*", "vit", "vit.*"]),
    package_data={"vit": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        # What torch 2.14.1 brings (3.8) down to what torch 2.11 brings (3.6): an unpinned triton
        # would first fetch the newest, which torch then refuses.
        "triton>=3.6,<3.9; platform_system == 'Linux'",
        "einops",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pillow", *PEERS],
        "bench": ["pytest", "pytest-benchmark", "pillow", *PEERS],
    },
)

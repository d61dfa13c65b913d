from setuptools import setup

PEERS = ["timm", "torchvision==0.29.1", "transformers"]

setup(
    name="vitriton",
    version="0.1.0",
    description="Fused Triton kernels for Vision Transformers: attention and patch projection, "
    "exact against an einsum reference, swapped into timm, torchvision and Hugging Face ViTs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=["kernels", "vit"],
    package_data={"vit": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "einops",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pillow", *PEERS],
        "bench": ["pytest", "pytest-benchmark", "pillow", *PEERS],
    },
)

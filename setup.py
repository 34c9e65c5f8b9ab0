"""pnfs: Pose Neural Fabrics Search.

The Triton kernels live in the top-level folder ``kernels/`` and are installed as the
subpackage ``pnfs.kernels`` (never as a top-level ``kernels``: a PyPI package has that name).
"""

from pathlib import Path

from setuptools import find_packages, setup

packages = [*find_packages(include=["pnfs", "pnfs.*"]), "pnfs.kernels"]

setup(
    name="pnfs",
    version="0.1.0",
    description="Pose Neural Fabrics Search: a fast, faithful trainer for the PNFS paper",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"pnfs": "pnfs", "pnfs.kernels": "kernels"},
    package_data={"pnfs": ["configs/*.yaml", "keypoint_sets/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "pyyaml>=6",
        "webdataset>=0.2.86",
        "pycocotools>=2.0.7",
        "fvcore>=0.1.5",
        "timm>=1.0",
        "opencv-python-headless>=4.8",
        "simplejpeg>=1.7",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "deepspeed": ["deepspeed>=0.14"],
        "triton": ["triton>=3.0"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "hypothesis>=6.100"],
    },
)

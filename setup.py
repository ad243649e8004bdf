"""livr-ds: distributed training for Latent Implicit Visual Reasoning (LIVR).

CPU install (the CPU wheel of torch first, so nothing pulls a CUDA build):
    pip install torch==2.13.0 && pip install -e ".[dev]"
GPU install: your CUDA torch, then `pip install -e ".[gpu]"`.
"""

from setuptools import find_packages, setup

setup(
    name="livr-ds",
    version="0.1.0",
    description="Latent Implicit Visual Reasoning on DeepSpeed: masks, loaders, launch glue",
    packages=find_packages(include=["livr_ds", "livr_ds.*"]),
    package_data={"livr_ds.data": ["paper_results.json"]},  # the paper's Table 1 (livr-ds report)
    python_requires=">=3.10",
    install_requires=[
        # The floor is the one torch the suite has run (2.13.0): flex attention's compiled
        # BlockMask builder with automatic dynamic shapes (livr_ds/segments.py) and
        # TORCH_ELASTIC_SHUTDOWN_TIMEOUT (slurm/train.sbatch) are verified there and not below.
        # CPU installs pin torch==2.13.0 first (README); never torchvision.
        "torch>=2.13",
        "deepspeed==0.19.8",
        "transformers==5.24.0",
        "tokenizers>=0.23,<0.24",
        "peft==0.21.2",
        "accelerate==1.15.0",
        "webdataset==1.0.2",
        "pyyaml>=6",
        "wandb==0.31.0",
        "pillow>=10",
        "safetensors>=0.8",
        "numpy>=1.26",
        "tqdm>=4.66",
        "scikit-image>=0.24",  # real photos for the demo tasks, SSIM for de-duplication
        "pyarrow>=15",  # BLINK-style parquet input
        "matplotlib>=3.8",  # attention maps, sample grids
        "imagehash>=4.3",  # perceptual-hash de-duplication against test sets
        "ninja",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["livr-ds=livr_ds.cli:main"]},
)

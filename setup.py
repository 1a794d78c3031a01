from setuptools import find_packages, setup

setup(
    name="megatron_sv",
    version="0.1.0",
    description="Megatron-Core fork with scale-vector improvements (HG, DNP, OR/ER, IWD, unified)",
    packages=find_packages(include=["megatron_sv", "megatron_sv.*"]),
    py_modules=["pretrain_gpt_sv"],
    # modeling code copied next to exported dnp/unified checkpoints (trust_remote_code)
    package_data={"megatron_sv.conversion": ["remote_code/*.py"]},
    include_package_data=True,
    # The declared ranges are the tested ones (docs/versions.md): the CPU adapter patches Megatron-Core
    # internals, so every megatron-core release is checked before it is allowed. megatron-core >= 0.17
    # needs Python >= 3.12; 0.16.1 is the newest for Python 3.11.
    python_requires=">=3.11,<3.13",
    install_requires=[
        # any 2.13.x keeps an installed CPU or CUDA build of it
        "torch>=2.13,<2.14",
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core==0.19.2; python_version >= '3.12'",
        "numpy",
        "psutil",
        "sentencepiece",
        "tensorboard",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.45", "safetensors"],
        "wandb": ["wandb"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff==0.17.6",
            "transformers>=4.45",
            "safetensors",
            "matplotlib",
            "wandb",
            # tests: torchao's Float8Linear is the independent oracle of our FP8 linears
            "torchao==0.18.0",
        ],
    },
)

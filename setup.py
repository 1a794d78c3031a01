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
    python_requires=">=3.10",
    install_requires=[
        # unpinned so an installed CPU or CUDA build is kept
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "psutil",
        "sentencepiece",
        "tensorboard",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.45", "safetensors"],
        "dev": ["pytest", "pytest-timeout", "transformers>=4.45", "safetensors", "matplotlib",
                # tests: torchao's Float8Linear is the independent oracle of our FP8 linears
                "torchao>=0.18"],
    },
)

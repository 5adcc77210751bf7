from setuptools import find_packages, setup

setup(
    name="elo",
    version="0.1.0",
    description="ELO: efficient layer-specific optimization for language adaptation of LLMs, in pure PyTorch",
    packages=find_packages(include=["elo", "elo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5,<=2.13.0",  # a range the CPU wheel on disk satisfies; never pulls a CUDA build there
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tiktoken>=0.7",
        "numpy>=1.24",
        "huggingface_hub>=0.23",
    ],
    extras_require={
        # reference implementations: used only by tests and benchmarks to prove parity and speed
        "dev": ["pytest>=8", "transformers>=4.46", "tokenizers>=0.20", "gguf>=0.10", "protobuf", "peft", "lm_eval"],
    },
)

from setuptools import find_packages, setup

setup(
    # "elo" on PyPI is an unrelated chess-rating package: a distinct distribution name keeps `pip install` from ever
    # pulling it in; the import name stays `elo`
    name="elo-llm",
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
        "tomli>=1.1; python_version < '3.11'",  # pipeline recipes: tomllib is in the standard library from 3.11
    ],
    extras_require={
        "plot": ["matplotlib>=3.5"],  # the pipeline report's figures; without it the report has tables only
        "hub": ["pyarrow>=14"],  # Parquet data sources (most Hugging Face Hub datasets); JSONL and text need nothing
        "log": ["tensorboard>=2.10"],  # --log tensorboard (wandb: pip install wandb)
        # reference implementations: used only by tests and benchmarks to prove parity and speed (+ the figures path)
        "dev": ["pytest>=8", "transformers>=4.46", "tokenizers>=0.20", "gguf>=0.10", "protobuf", "peft", "lm_eval",
                "matplotlib>=3.5", "pyarrow>=14", "tensorboard>=2.10"],
    },
)

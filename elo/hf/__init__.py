"""Hugging Face formats: model names and where they resolve (local, hub, the offline default model), safetensors
checkpoints read lazily and written atomically, and the tokenizers (SentencePiece, tiktoken/BPE) without `tokenizers`."""

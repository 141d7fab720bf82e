"""Data: data SPEC sources (random access, streaming, mixtures), tokenizers (SentencePiece, HF tokenizer.json), the grain pipeline and ArrayRecord prepare."""

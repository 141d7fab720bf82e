"""Data: data SPEC sources, tokenizers (SentencePiece, HF tokenizer.json), the grain pipeline and ArrayRecord prepare."""

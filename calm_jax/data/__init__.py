"""Data: sentencepiece tokenizer, data SPEC sources, the grain pipeline and the prepare CLIs."""

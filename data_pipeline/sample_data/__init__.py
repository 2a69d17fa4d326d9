"""Sample data and the tiny tokenizer bundled with the package (see make_sample_data.py, make_tiny_tokenizer.py)."""

"""What the pipeline writes and the trainer, export and generation read, in one place both import.

  records.py        the record schema (tf.train.Example features), TFRecord framing, shard file names
  dataset.py        the dataset directory: manifest.json, the tokenizer copy, the default sample location
  tokenizer.py      loading a tokenizer (local, gs://, hub) as a fast tokenizer whose ids equal SentencePiece's
  chat_template.py  the Llama 2 chat template and the loss mask, as AgentLM was trained

Light imports only (no Apache Beam, no JAX): the trainer imports these.
"""

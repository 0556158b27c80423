"""GGUF, llama.cpp's and Ollama's format: export of ouvert's models and import of the files people bring.

Rooms, lowest first:
  codec.py   tensor types: encode and decode through the gguf package (llama.cpp's own library)
  names.py   the name tables (ours <-> GGUF's, per architecture) and the rotary-layout transforms
  read.py    GGUFFile: the header, metadata and tensor index, memory-mapped
  config.py  a ModelConfig recovered from the metadata
  vocab.py   the tokenizer in the metadata, both ways
  write.py   write_gguf: a model and its tokenizer to a file llama.cpp runs
  load.py    load_gguf: a file to a Transformer (block tensors stay in blocks)
"""

from ouvert.checkpoint.gguf.load import load_gguf
from ouvert.checkpoint.gguf.read import GGUFFile
from ouvert.checkpoint.gguf.vocab import gguf_tokenizer
from ouvert.checkpoint.gguf.write import write_gguf

__all__ = ["GGUFFile", "gguf_tokenizer", "load_gguf", "write_gguf"]

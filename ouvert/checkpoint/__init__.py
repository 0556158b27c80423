"""Checkpoints: reading and writing models in the formats people use.

Rooms, lowest first (each imports only the ones above it in this list):
  base.py      what every format shares: CheckpointError, the HF name table, build on the meta
               device and assign, the two rotary layouts, atomic directory writes
  manifest.py  ouvert.json: where a checkpoint came from (provenance, hashes)
  hf.py        Hugging Face directories: config.json + safetensors (FP8 and ouvert's quantized too)
  meta.py      Meta's params.json + consolidated.*.pth
  gguf/        llama.cpp's and Ollama's GGUF files, both ways
  io.py        the front door: load_model, save_model, load_tokenizer, export_hf, export_gguf
"""

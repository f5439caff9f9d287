"""Pure, shared pieces: typed config, model and LoRA factory, adapter arrays, data, privacy math."""

"""The models layer: loading a policy with its LoRA adapter (`loading`), log-probs and entropy from hidden
states in chunks (`forward`), transformers/peft KV-cache plumbing (`kv_cache`), the out-of-place LoRA merge for
decoding (`merge`), and the embedded tiny model with its data (`tiny`, `tiny_data`)."""

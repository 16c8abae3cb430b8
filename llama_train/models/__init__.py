"""Where base models come from: a hub id or local directory, a GGUF file (converted once and
cached), the small catalogue (`llama-train model pull`), or the tiny random builder."""

"""The mixer inside other trainers: `hf` (Hugging Face `Trainer`) and `lightning` (Lightning `Trainer`). Each
module imports its framework at the top; import the one you use."""

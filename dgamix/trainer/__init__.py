"""dgamix reference trainer (a small nanoGPT-style GPT that draws its data from the mixer)."""

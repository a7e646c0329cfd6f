"""dgamix: online data mixing for LM pretraining, re-weighted by Dynamic Gradient Alignment.

Packages, in the one direction their imports run:
    core       parameters (every stage's defaults, validation) and atomic file writes
    formats    one module per artifact that crosses a stage boundary: schema, reader, writer, format version
    pipeline   the offline DVC stages (ingest, embed, cluster, assign, stats, tokenize, bases)
    mixer      the online side: cluster store, mixture, stream, strategies, alignment, trainer hooks
    trainer    the small reference GPT trainer
    cli        `dgamix <command>`: dispatch only
"""

"""dgamix online side (cluster store, mixture stream, strategies). Built on the offline pipeline's outputs."""

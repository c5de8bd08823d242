"""Models: loading a checkpoint (or building the tiny test model), its quantized weights, and how its forward is called."""

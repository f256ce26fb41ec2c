"""Model adapters: one module per model family; each only knows how to reach its layers, masks and positions."""

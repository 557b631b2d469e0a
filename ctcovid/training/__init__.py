"""Training and evaluation: data layouts, the slice cache, the split, the train loop, metrics."""

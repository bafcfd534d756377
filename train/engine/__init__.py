"""Training: the one training-run path (`run`), its loop (`trainer`) and strategies."""

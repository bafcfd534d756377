"""The absl trainer (keras_bn.train)."""

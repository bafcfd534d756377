"""The absl trainer (keras_bn.train): rooms by concern, imports pointing one way.

`cli` (flags, the command line) -> `experiments` (figure1, table2, evaluate) -> `engine` (the
training run and its loop) -> `evaluation`, `data`, `rundir` -> `config` (settings, presets).
"""

"""The absl trainer (keras_bn.train): rooms by concern, imports pointing one way.

`cli` -> `experiments` -> `evaluation` -> `engine` -> `data` -> `config` -> `rundir`, and every
room -> `messages` (the README's Layout section says what each room holds).
"""

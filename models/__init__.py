"""The model zoo (keras_bn.models): the paper's networks."""

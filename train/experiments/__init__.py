"""The paper's experiments, each training its nets through `keras_bn.train.engine.run`."""

"""The command line: absl flags, the entry point, and keeping TensorFlow's C++ logs quiet."""

"""`python -m keras_bn.train`: the trainer's command line (`keras_bn.train.cli.main`)."""

from keras_bn.train.cli.main import run

if __name__ == "__main__":
    run()

"""cvae: a fast CPU trainer and generator for conditional VAEs on MNIST-format digits."""

__version__ = "0.1.0"

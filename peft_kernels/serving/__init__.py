"""Serving many adapters at once: ``AdapterPool`` keeps registered adapters in CPU memory and loads the ones each
batch needs into a fixed number of preallocated device slots (least recently used out)."""

from peft_kernels.serving.pool import AdapterPool

__all__ = ["AdapterPool"]

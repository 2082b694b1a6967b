"""nmm-compile: the train step compiled for accelerators that are not attached (deviceless AOT)."""

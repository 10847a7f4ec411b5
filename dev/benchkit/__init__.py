"""The pieces of `make bench` (dev/bench.py): the stack it starts, the
load it drives, the key service of the auth_request case, the slow
streams of the memory case and the re-framer microbenchmark."""

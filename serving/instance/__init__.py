"""An instance: one process hosting an engine in a role (prefill, decode, colocated) behind the
Instance gRPC service (servicer.py, proto/instance.proto); main.py is its process entry point."""

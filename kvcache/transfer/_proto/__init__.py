"""Generated from proto/kv_transfer.proto by `make proto` (proto/Makefile.inc); do not edit by hand."""

"""Generated from proto/instance.proto by `make proto` (proto/Makefile.inc); do not edit by hand."""

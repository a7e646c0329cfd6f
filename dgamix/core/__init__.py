"""The shared core every other part builds on: parameters (defaults, validation, errors) and atomic I/O."""

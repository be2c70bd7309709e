"""Generated from proto/attestd/v1 by proto/generate.py; do not edit."""

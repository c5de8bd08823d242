"""Inputs: a dataset of prompts opened as an Arrow table (source), its records checked into Prompts (records), and
what a prompt that cannot run becomes (screening)."""

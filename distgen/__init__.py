"""distgen: distributed offline batch text generation with Hugging Face models.

From Python: `distgen.generate(prompts, model=..., overrides=[...])` and `distgen.read_outputs(output_dir)`
(distgen/api.py); from the command line: `python -m distgen.launch ...` and `python -m distgen.run ...`.
"""

__version__ = "0.1.0"
__all__ = ["generate", "read_outputs", "ConfigError", "JobFailed"]  # the errors distgen.generate raises


def __getattr__(name: str):
    # Imported on first use, so `import distgen.config` (the schema) stays light.
    if name in __all__:
        from distgen import api
        return getattr(api, name)
    raise AttributeError(f"module 'distgen' has no attribute {name!r}")

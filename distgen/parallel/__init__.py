"""Parallel: rank discovery (env), the shared length table and prompt feed (feed), which rank gets which prompts
(plan), the synced generation loop (loop) and how the model is placed over the ranks (layouts)."""

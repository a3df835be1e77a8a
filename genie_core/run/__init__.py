"""A run of `genie run`: its stages and what each depends on (`stages`), and the folder it lives in (`folder`: the
one object that knows where a run keeps its recipe, stages, checkpoints, data and evaluation)."""

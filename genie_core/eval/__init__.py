"""Measuring worlds: held-out scores beside the baselines (`evaluate`), the metrics themselves (`metrics`), FVD on
local I3D weights (`fvd`), charts (`plots`) and the Markdown reports (`report`)."""

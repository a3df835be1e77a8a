"""A trained world: its components saved and rebuilt (`components`), and played frame by frame (`model`: `World`,
`Rollout`). It knows nothing of training; a run folder (`genie_core.run`) hands it its parts."""

"""Agents from unlabeled video (the paper's section 3.3): a policy cloned from expert footage through the latent
actions a trained latent action model infers (`cloning`), then mapped to the game's actions with a few labelled
transitions and scored in the real game."""

"""The Lightning layer of training: the LightningModule (``module``), its callbacks (EMA, previews, FID, the
non-finite-loss guard, post-hoc EMA tracking) and writing checkpoints whole at every ending
(``checkpoint_writing``). Reading them back needs no Lightning: :mod:`diffusion.models`."""

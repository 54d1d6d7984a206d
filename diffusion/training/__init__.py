"""The Lightning layer of training: the LightningModule (``module``), its callbacks (EMA, previews, FID, the
non-finite-loss guard), writing checkpoints whole at every ending (``checkpoint_writing``) and reading them back
safely (``checkpoint_reading``)."""

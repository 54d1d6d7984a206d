"""The model as a checkpoint holds it, with no training layer: the layout of its hyperparameters (``hparams``),
building the network and the objective from them with Hydra (``building``), reading checkpoints safely and loading
the model to sample from (``checkpoints``), and the post-hoc EMA reconstructed from a run's snapshots
(``posthoc_ema``). sample.py needs nothing else, and Lightning need not be installed."""

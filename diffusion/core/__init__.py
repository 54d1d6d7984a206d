"""The diffusion math in plain PyTorch: the objectives (one module per formulation) and the networks (any
``nn.Module`` of one interface), the model that joins them, noise levels and schedules, the denoiser, the samplers
and the drawing pipeline, the EMA's arithmetic, the learning-rate schedule and image conversions. Nothing here
imports Lightning, Hydra, OmegaConf or torchvision (tests/test_layering.py imports every module of this package,
found by walking it, with those blocked)."""

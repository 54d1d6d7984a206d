"""The diffusion math and the network in plain PyTorch: noise schedules, prediction targets, the reverse process,
losses, the denoiser, the samplers and the drawing pipeline, the UNet, the EMA's arithmetic, the learning-rate
schedule and image conversions. Nothing here imports Lightning, Hydra, OmegaConf or torchvision
(tests/test_layering.py imports every module of this package, found by walking it, with those blocked)."""

"""The data: the LightningDataModule (``datamodule``), the datasets it reads (``datasets``, on torchvision) and the
seeded, sharded, resumable batches it serves (``loaders``, plain PyTorch)."""

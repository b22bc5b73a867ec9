"""Training with Lightning: the SRUM LightningModule, its data, parallelism, callbacks and export."""

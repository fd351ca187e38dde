"""The Lightning layer: the LightningModule, the LightningDataModule, callbacks, checkpoint IO and SyncBN."""

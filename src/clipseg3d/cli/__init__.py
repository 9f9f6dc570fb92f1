"""The `clipseg3d` command: LightningCLI training subcommands and the package's tools."""

"""genalign training: configs, data, advantages, losses, one file per algorithm, the `align` CLI."""

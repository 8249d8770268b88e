"""The training program: config, data, trainer, and the scripts users run."""

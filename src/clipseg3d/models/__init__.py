"""The network: backbones, text encoder, dynamic head, the model and its checkpoints."""

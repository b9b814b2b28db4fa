"""Training pipeline stages: captions, caption split, feature cache, losses, trainer."""

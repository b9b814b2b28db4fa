"""Training: captions, caption split, cached training data, losses, the one training loop (`loop`, checkpoints:
`checkpoint`), the FTI4CIR trainer (`trainer`) and M2C training (`m2c`)."""

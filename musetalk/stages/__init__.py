"""The model stages: audio features, faces (landmarks + crop), VAE, UNet, face parsing, blending.

Each stage is a small module of pure functions over numpy/torch plus, where weights are involved, one model
object built once with ``from_pretrained``. Stages import only config, weights, devices and errors.
"""

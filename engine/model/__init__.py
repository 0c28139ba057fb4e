"""The model: loading open_clip weights with a fingerprint, and encoding text and images with it.

    load.py            ModelSpec -> LoadedModel (open_clip tags, hf-hub ids, local checkpoints, configs)
    text_encoder.py    the fast text pass: prompts run only up to their pooled token, without padding
"""

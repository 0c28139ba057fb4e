"""The offline demo: a synthetic world, a CLIP trained from scratch on it, and the attack on that CLIP.

    world.py           people, membership, occurrence counts, captions and photos of the world
    faces.py           face-like pictures of synthetic identities
    tiny_model.py      the tiny open_clip model and made-up names of the tests
    training.py        training the small CLIP on the members' captioned photos
    run.py             run_demo: world, training, build-index, query, evaluate
"""

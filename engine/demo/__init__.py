"""The offline demo: a synthetic world, a CLIP trained from scratch on it, and the attack on that CLIP.

    world.py           people, membership, occurrence counts, captions and photos of the world
    synthetic.py       the tiny open_clip model of the tests and face-like pictures
    training.py        training the small CLIP on the members' captioned photos
    run.py             run_demo: world, training, build-index, query, evaluate
"""

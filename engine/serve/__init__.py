"""`serve`: the question "does this model know my face?" as a web page and a JSON API over a built index.

One process loads the index's model and opens its name indexes once (`scorer.py`); each request brings
1..N photos and one typed name, which are scored exactly as `query` scores a person (`scorer.py`), placed
among the members and non-members of a reference report when one is given (`reference.py`), and answered
about that name alone (the guardrails in `app.py`). Photos are parsed and decoded in memory
(`upload.py`, `photos.py`) and written nowhere unless the server was started with `--keep` (`keep.py`).
"""

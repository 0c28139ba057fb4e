"""Stage 1 of build-index: the candidate names and the prompt templates they are put into.

    names_file.py      reading names.txt (one full name per line, NFC, duplicates dropped)
    made_up.py         made-up "First Last" names from the US census lists (the `names` command)
    templates.py       the paper's 21 prompt templates and user template files
    prompt_lengths.py  which names the model's context would truncate, and which then collide
"""

"""The name index: what build-index writes (every (template, name) prompt encoded) and query reads.

    layout.py          the index directory on disk: manifest, file names, checks
    directory.py       what a build may write into, finished builds, stale generations
    build.py           build_index: plan, encode, index, publish
    encode.py          encoding prompts: the streaming, resumable vectors files of a build
    reader.py          open_index / NameIndex: the verified, pinned index a query searches
"""
